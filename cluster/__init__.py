"""Starting pdserve's processes: the no-Ray local launcher now, Ray placement later."""
