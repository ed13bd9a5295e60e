"""kdzoo.connectors."""
