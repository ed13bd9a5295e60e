"""kdzoo.evaluation."""
