"""Developer tooling: the dev stack, demo, mail catcher and journey simulator; production commands never import it."""
