"""What both worker roles share: start-up and arguments, the runtime, the ranks of an
instance, sessions, metrics, the registry record and the proto conversions."""
