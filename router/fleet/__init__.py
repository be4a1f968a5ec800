"""The fleet: the workers the router knows, their health and breakers, load, the registry, and
the routing policies."""
