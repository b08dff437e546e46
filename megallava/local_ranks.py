"""Run ``fn(rank, env)`` on N ranks forked from this process and joined by gloo (one machine, no launcher).

Used by ``tools/convert_checkpoint.py verify`` to load a checkpoint at a TP x PP layout on CPU, and by the
multi-rank tests. Forking after megatron is imported brings 4 ranks up in well under a second (spawn/torchrun
re-import for 10+ s). Results travel back pickled; an exception in any rank is re-raised with that rank's traceback;
a hang is killed after ``timeout`` seconds and reported, never waited on forever.
"""
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import time
import traceback

import torch

from megallava.distributed import LaunchEnv, free_port, shutdown


def _child(rank, world_size, port, fn, conn):
    try:
        # One thread per rank: ranks share the cores, and OpenMP's pool is not fork-safe once the parent used it.
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        result = fn(rank, LaunchEnv(rank, world_size, rank, "127.0.0.1", port))
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        try:
            shutdown()
        except Exception:  # noqa: BLE001
            pass
        conn.close()
        os._exit(0)


def run_ranks(world_size: int, fn, timeout: float = 180):
    """Run ``fn(rank, env)`` on every rank; return the list of results in rank order."""
    import megatron.core  # noqa: F401  (imported once here so the children inherit it)

    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent, child = ctx.Pipe(duplex=False)
        # Not daemonic: ranks start DataLoader workers. The finally below kills any rank that outlives the run.
        p = ctx.Process(target=_child, args=(rank, world_size, port, fn, child), daemon=False)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    results, errors = [None] * world_size, []
    pending = dict(enumerate(conns))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            # After the first failure the other ranks may block in a collective: give them a moment, then stop.
            wait_s = 3.0 if errors else deadline - time.monotonic()
            ready = mp_connection.wait(list(pending.values()), timeout=max(wait_s, 0))
            if not ready:
                if not errors:
                    errors.append(f"ranks {sorted(pending)} gave no result within {timeout} s (hang?)")
                break
            for conn in ready:
                rank = next(r for r, c in pending.items() if c is conn)
                del pending[rank]
                try:
                    status, payload = pickle.loads(conn.recv_bytes())
                except EOFError:
                    status, payload = "error", "process died without a result"
                if status == "error":
                    errors.append(f"--- rank {rank} ---\n{payload}")
                else:
                    results[rank] = payload
    finally:
        for p in procs:
            p.join(0 if errors else 5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("multi-rank run failed:\n" + "\n".join(errors))
    return results
