"""Experiments: what a zoo's runs are and in which phases they train (a plain zoo, lottery
tickets), behind one protocol the builder calls."""
