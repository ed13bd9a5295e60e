"""kdzoo.backbones."""
