"""kaeru: marketing automation for online shops on Temporal."""
