"""Dataset preparation scripts: text -> data/<name>/{train.bin, val.bin, meta.json}."""
