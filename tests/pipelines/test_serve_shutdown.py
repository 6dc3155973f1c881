"""``gattn serve`` stops cleanly on SIGTERM (containers, systemd) as on Ctrl-C.

A real ``gattn serve`` process on a free loopback port serves a tiny CNN segmenter from a
folder; a prediction is in flight (held in the ingress's dynamic-batch queue) when SIGTERM
arrives. The request must be answered, the process must exit 0 within 15 s, and none of the Ray
processes it started may remain. Those are found by a marker in their environment (every Ray
process inherits the driver's), never by name: other sessions' Ray runs on the same machine.
The signal comes once the app runs, and (``deploying``) while ``gattn serve`` still waits in
``serve.run`` (in a thread) for the app it already serves to be reported running: the proxy
routes to an ingress replica as soon as it is up.

The ingress's drain (refuse new requests, wait for those in flight) is also checked on its own,
without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from gattn.models import build_model, save_model
from pipelines.config import ServeParams
from pipelines.stages.deploy import serve_config

pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
SEG = {"task": "seg", "backbone": "gattn_local_cnn", "num_classes": 3, "head": "fcn"}
MARK = "GATTN_TEST_SERVE_SHUTDOWN"
STOP_WITHIN_S = 15.0
RUNNING = "Ctrl-C or SIGTERM stops"  # what gattn serve prints once its apps run

# ``gattn serve`` as the entry script runs it, with ``serve.run`` (argv[1] = "slow") polling
# Serve's status for 60 s more after the app runs, as Serve's own wait does between polls.
SERVE = """
import sys, time
from ray import serve

if sys.argv[1] == "slow":
    run = serve.run

    def slow_run(*args, **kwargs):
        handle = run(*args, **kwargs)
        for _ in range(60):
            time.sleep(1.0)
            serve.status()  # raises once Serve is shut down
        return handle

    serve.run = slow_run

from pipelines.cli import main

sys.exit(main(sys.argv[2:]))
"""


def processes_marked(value: str) -> dict[int, str]:
    """``pid -> command line`` of this user's processes whose environment has
    ``MARK=value``."""
    found = {}
    needle = f"{MARK}={value}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(entry.name)] = cmd.strip()[:120]
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (40, 200, 90)).save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, data: bytes, out: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            out["status"] = response.status
    except urllib.error.HTTPError as err:
        out["status"] = err.code
    except OSError as err:  # connection refused, reset or dropped
        out["error"] = repr(err)


@pytest.mark.slow  # one local Ray with Serve: about a minute to start on 2 cores
@pytest.mark.parametrize("deploying", [False, True], ids=["running", "deploying"])
def test_sigterm_answers_requests_in_flight_and_leaves_nothing(
    tmp_path: Path, free_port: Callable[[], int], deploying: bool
) -> None:
    torch.manual_seed(0)
    model_dir = save_model(
        build_model(SEG), SEG, tmp_path / "seg", classes=["a", "b", "c"], img_size=32
    )
    port = free_port()
    # A lone request waits batch_wait_timeout_s in the ingress for its batch to fill: it is in
    # flight, short of the model replica, when the signal comes.
    p = ServeParams(port=port, num_cpus=1, max_batch_size=8, batch_wait_timeout_s=2.0)
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(serve_config(p, str(model_dir))))
    marker = uuid.uuid4().hex
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT), **{MARK: marker})
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "slow" if deploying else "-"]
            + ["serve", "--config", str(config)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, to clean up after a failure
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"gattn serve exited early:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not up in 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        while not deploying and RUNNING not in log.read_text():  # serve.run has returned
            assert time.monotonic() < deadline, f"not up in 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        assert len(processes_marked(marker)) > 3  # the driver and its Ray processes

        answer: dict[str, Any] = {}
        in_flight = threading.Thread(target=post, args=(f"{url}/v1/predict", png(), answer))
        in_flight.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        stopped_in = time.monotonic() - t0
        in_flight.join(timeout=60)
        text = log.read_text()
        assert rc == 0, text[-3000:]
        assert stopped_in < STOP_WITHIN_S, f"stopped in {stopped_in:.1f} s:\n{text[-3000:]}"
        assert answer == {"status": 200}, text[-3000:]
        assert "serve: shutting down" in text
        assert (RUNNING in text) is not deploying, text[-3000:]  # the signal came as meant

        deadline = time.monotonic() + 10  # let the last children be reaped
        while processes_marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_marked(marker) == {}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in processes_marked(marker):  # only what this test started
            with contextlib.suppress(OSError):  # gone meanwhile
                os.kill(pid, signal.SIGKILL)


def test_ingress_drain_waits_for_requests_in_flight_and_refuses_new_ones() -> None:
    from pipelines.serve.app import GattnIngress, counted
    from pipelines.serve.http_io import InputError

    # The ingress's state and its drain methods, without the Serve replica around them.
    cls = GattnIngress.func_or_class
    ingress: Any = types.SimpleNamespace(in_flight=0, draining=False)
    ingress._in_flight = types.MethodType(cls._in_flight, ingress)
    ingress.drain = types.MethodType(cls.drain, ingress)

    async def slow(self: Any, seconds: float) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    endpoint = counted(slow)

    async def scenario() -> None:
        request = asyncio.create_task(endpoint(ingress, 0.5))
        await asyncio.sleep(0.05)
        assert ingress.in_flight == 1
        t0 = time.monotonic()
        assert await ingress.drain(timeout_s=5.0) == 0  # waited for it
        assert time.monotonic() - t0 >= 0.4
        assert request.done() and request.result() == {"slept": 0.5}
        with pytest.raises(InputError) as err:
            await endpoint(ingress, 0.0)
        assert err.value.status == 503
        # A request that outlives the timeout is reported, not waited for.
        ingress.in_flight = 1
        assert await ingress.drain(timeout_s=0.1) == 1

    asyncio.run(scenario())
