from decode_worker import MODES
from decode_worker.servicer import DecodeServicer
from worker.server import WorkerRole, main

ROLE = WorkerRole(modes=MODES, servicer=DecodeServicer, ranks_module="decode_worker.ranks")

if __name__ == "__main__":
    raise SystemExit(main(ROLE))
