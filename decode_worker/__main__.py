from worker.server import main

raise SystemExit(main(default_role="decode"))
