"""`python -m nmoe.serve --model DIR|tiny [--host 127.0.0.1] [--port 8000] [--api-key KEY] [serve flags]`.

Under `torchrun --nproc_per_node=N -m nmoe.serve ...` rank 0 runs uvicorn (main thread) and the
orchestrator loop (a second thread); the other ranks run the loop only. Ctrl-C / SIGTERM drains:
no new requests, the running ones finish, then every rank leaves the loop together and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from nmoe.serve.config import ServeConfig
from nmoe.serve.env import ENV

log = logging.getLogger("nmoe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nmoe.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder, or 'tiny' (the embedded model); sets --ckpt")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the printed URL names it)")
    p.add_argument("--api-key", default=ENV.api_key, help="require 'Authorization: Bearer KEY' (or NMOE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the folder name)")
    p.add_argument("--max-pending", type=int, default=512, help="unfinished requests before 429")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds a shutdown waits for streams")
    p.add_argument("--log-level", default="warning")
    ServeConfig.add_cli_args(p)
    args = p.parse_args(argv)
    if args.model is not None:
        args.ckpt = args.model
    return args


def model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return os.path.basename(os.path.normpath(args.ckpt)) or args.ckpt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServeConfig.from_cli_args(args)

    import torch.distributed as dist

    from nmoe.serve.control_plane import ControlPlane
    from nmoe.serve.dist import RankInfo, init_dist, shutdown
    from nmoe.serve.engine import Engine
    from nmoe.serve.orchestrator import Orchestrator

    ctx = init_dist(cfg.device)
    engine = Engine(cfg, rank=RankInfo(ctx.rank, ctx.world_size))
    cp = ControlPlane(ctx.rank, ctx.world_size, ctx.cpu_group, max_pending=args.max_pending)
    orch = Orchestrator(engine, ctx, hooks=cp)
    if ctx.rank == 0:
        rc = serve(args, engine, cp, orch)
    else:
        _defer_signals_to_rank0(ctx.rank)
        orch.run()  # raises RankFailure on every rank when one fails
        rc = 0
    if rc == 0 and ctx.distributed:  # leave together: a rank tearing gloo down under a peer aborts it
        dist.barrier(group=ctx.cpu_group)
    shutdown(ctx)
    return rc


def serve(args, engine, cp, orch) -> int:
    import uvicorn

    from nmoe.serve.api import build_app

    app = build_app(engine, cp, model_name(args), api_key=args.api_key)
    state = app.state.server
    failure: list[BaseException] = []

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT / SIGTERM: refuse new requests, let streams finish
            # no lock in a signal handler (ControlPlane.shutdown_signalled): two signals in a row
            # deadlocked the server when the second landed inside the first's Event.set
            state.ready = False
            cp.shutdown_signalled()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # exit normally once drained, not by re-raising the signal

    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=args.drain_timeout))

    def loop():
        try:
            orch.run()
        except BaseException as e:  # the loop died: fail every pending request, stop serving
            failure.append(e)
            state.ready = False
            cp.fail_all(f"the engine stopped: {e}")
            server.should_exit = True

    worker = threading.Thread(target=loop, name="nmoe-orchestrator", daemon=True)
    worker.start()
    threading.Thread(target=_announce, args=(server, state, args, cp.world_size), daemon=True).start()
    server.run()
    cp.request_shutdown()
    worker.join(args.drain_timeout)
    if worker.is_alive():
        cp.fail_all("the server shut down before the request finished")
        worker.join(args.drain_timeout)
    if failure:
        print(f"nmoe: the engine stopped: {failure[0]}", file=sys.stderr, flush=True)
        return 1
    print("nmoe: stopped", flush=True)
    return 0


def _announce(server, state, args, world_size: int) -> None:
    """Print the URL once uvicorn listens (with --port 0, the port it got)."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.02)
    port = args.port
    for s in getattr(server, "servers", []):
        for sock in s.sockets:
            port = sock.getsockname()[1]
    state.ready = True
    print(f"nmoe: serving {state.model_name!r} at http://{args.host}:{port} (world size {world_size})", flush=True)


def _defer_signals_to_rank0(rank: int) -> None:
    """Ranks > 0 leave when rank 0 broadcasts shutdown (after draining); a second signal exits now."""
    def handler(sig, frame):
        print(f"nmoe rank {rank}: signal {sig}: waiting for rank 0 to drain (again to force)", file=sys.stderr,
              flush=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
