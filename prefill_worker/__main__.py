from prefill_worker.servicer import PrefillServicer
from protos.contract import ROLE_PREFILL
from worker.server import WorkerRole, main

# No ranks module: expert parallelism on the prefill side is not supported yet.
ROLE = WorkerRole(modes=(ROLE_PREFILL,), servicer=PrefillServicer)

if __name__ == "__main__":
    raise SystemExit(main(ROLE))
