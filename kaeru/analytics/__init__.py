"""Analytics over the touchpoints every journey writes: KPIs, funnels, attribution, routes,
send-time heatmap and experiments (shape: :mod:`kaeru.analytics.model`)."""
