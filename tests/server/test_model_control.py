"""Model control: version folders decide the version, version policies, a failed load that takes nothing down,
explicit load/unload over genserve.v1, OIP gRPC and HTTP, the modes that refuse it, and warm-up at load."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from ports import free_port
from supervised import serving
from tritonclient.utils import InferenceServerException

from genserve.clients.channel import GenserveError
from genserve.clients.client import Client
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig

MODEL = "digits-ppca"
X = np.full((2, 8, 8), 3.0, np.float32)


def set_config(repo: Path, name: str, **settings) -> None:
    path = repo / name / "config.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **settings}))


def copy_version(repo: Path, name: str, src: int, dst: int, corrupt: bool = False) -> None:
    """``cp -r name/src name/dst`` as an operator would (the manifest still says version ``src``), built beside
    and renamed so a rescan never sees half a folder."""
    tmp = repo / name / f".{dst}.tmp"
    shutil.copytree(repo / name / str(src), tmp)
    if corrupt:
        graph = next(tmp.glob("*.onnx"))
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    tmp.rename(repo / name / str(dst))


class Load:
    """Client threads scoring ``MODEL`` (version 0: the default) until stopped; every outcome is kept."""

    def __init__(self, target: str, threads: int = 4) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self.versions: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(target,), daemon=True) for _ in range(threads)]

    def _run(self, target: str) -> None:
        with Client(target, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.log_likelihood(MODEL, X, seed=1)
                    with self._lock:
                        self.ok += 1
                        self.versions.add(r.version)
                except GenserveError as e:
                    with self._lock:
                        self.failures.append(str(e))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def wait_for(self, n: int) -> None:
        """Until ``n`` more requests have been answered (the load is really running)."""
        start = self.ok
        deadline = threading.Event()
        for _ in range(12000):
            if self.ok >= start + n or self.failures:
                return
            deadline.wait(0.01)
        raise AssertionError("the load made no progress")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


@pytest.fixture(params=[1, 2], ids=["1 process", "2 processes"])
def serve(request: pytest.FixtureRequest, tmp_path: Path):
    """``serve(cfg)``: the server of ``cfg`` in this process, or as `genserve serve --processes 2` (issue 17:
    a change that reached one worker must reach every worker before it is answered)."""
    return lambda cfg: serving(cfg, request.param, tmp_path / "server.log")


def test_a_copied_version_folder_serves_under_its_folder_number_and_no_request_fails(engine_config,
                                                                                      repo_copy, serve) -> None:
    cfg = replace(engine_config, repo=repo_copy)
    with serve(cfg) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        before = client.log_likelihood(MODEL, X, seed=1)
        with Load(f"127.0.0.1:{srv.port}") as load:
            load.wait_for(20)
            copy_version(repo_copy, MODEL, 1, 2)  # the manifest inside still says version 1
            result = client.reload()
            load.wait_for(20)
            shutil.rmtree(repo_copy / MODEL / "1")
            after_removal = client.reload()
            load.wait_for(20)
        info = client.info(MODEL)
        after = client.log_likelihood(MODEL, X, seed=1)
    assert load.failures == [] and load.ok >= 60 and load.versions == {1, 2}
    assert next(m for m in result if m.name == MODEL).versions == (1, 2)
    assert next(m for m in after_removal if m.name == MODEL).versions == (2,)
    assert info.version == 2 and after.version == 2
    np.testing.assert_array_equal(after.log_prob, before.log_prob)  # the same graphs give the same numbers


def test_version_policy_latest_and_specific_choose_the_served_versions(engine_config, repo_copy, serve) -> None:
    set_config(repo_copy, MODEL, version_policy={"latest": {"num_versions": 1}})
    copy_version(repo_copy, MODEL, 1, 2)
    copy_version(repo_copy, MODEL, 1, 3)
    cfg = replace(engine_config, repo=repo_copy)
    with serve(cfg) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        latest = next(m for m in client.models() if m.name == MODEL)
        serving = client.info(MODEL).serving
        set_config(repo_copy, MODEL, version_policy={"specific": {"versions": [1, 3, 7]}})
        specific = next(m for m in client.reload() if m.name == MODEL)
        with pytest.raises(GenserveError) as gone:
            client.log_likelihood(MODEL, X, seed=1, version=2)
        set_config(repo_copy, MODEL, version_policy={"all": {}})
        every = next(m for m in client.reload() if m.name == MODEL)
        set_config(repo_copy, MODEL, version_policy={"latest": {"num_versions": 0}})
        bad = next(m for m in client.reload() if m.name == MODEL)
    assert latest.versions == (3,) and serving["version_policy"] == {"latest": {"num_versions": 1}}
    assert specific.versions == (1, 3) and "version_policy names version 7" in specific.message
    assert gone.value.code == grpc.StatusCode.NOT_FOUND and "loaded versions: 1, 3" in gone.value.message
    assert every.versions == (1, 2, 3) and every.state == "READY"
    # A policy that does not parse changes nothing: what served keeps serving, and the message says why.
    assert bad.versions == (1, 2, 3) and "num_versions >= 1" in bad.message


def test_a_new_version_that_fails_to_load_never_takes_the_serving_one_down(engine_config, repo_copy, serve) -> None:
    set_config(repo_copy, MODEL, version_policy={"latest": {"num_versions": 1}})
    cfg = replace(engine_config, repo=repo_copy)
    with serve(cfg) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        with Load(f"127.0.0.1:{srv.port}") as load:
            load.wait_for(20)
            copy_version(repo_copy, MODEL, 1, 2, corrupt=True)
            status = next(m for m in client.reload() if m.name == MODEL)
            load.wait_for(20)
        health = client.health(MODEL)
    assert load.failures == [] and load.versions == {1}
    assert status.versions == (1,) and status.state == "READY" and "version 2" in status.message
    assert "sha256" in status.message and health == "SERVING"


def explicit(engine_config: ServerConfig, repo: Path, **kw) -> ServerConfig:
    return replace(engine_config, repo=repo, model_control="explicit", load_models=MODEL, http_port=0, **kw)


def test_explicit_model_control_loads_and_unloads_over_every_api(engine_config, repo_copy, serve) -> None:
    cfg = replace(explicit(engine_config, repo_copy), http_port=free_port())
    vae = "digits-vae"
    with serve(cfg) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        listed = {m.name: m for m in client.models()}
        with pytest.raises(GenserveError) as not_loaded:
            client.log_likelihood(vae, X, seed=1)
        loaded = client.load_model(vae)
        score = client.log_likelihood(vae, X, seed=1)
        health = client.health(vae)
        unloaded = client.unload_model(vae)
        health_after = client.health(vae)
        # The Open Inference Protocol's repository extension, gRPC then HTTP, by tritonclient.
        grpc_oip = triton_grpc.InferenceServerClient(f"127.0.0.1:{srv.port}")
        grpc_oip.load_model(vae)
        grpc_ready = grpc_oip.is_model_ready(f"{vae}.log_likelihood")
        grpc_oip.unload_model(f"{vae}.log_likelihood")  # any of its OIP names unloads the whole model
        grpc_unready = grpc_oip.is_model_ready(f"{vae}.log_likelihood")
        http = triton_http.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
        http.load_model(vae)
        http_ready = http.is_model_ready(f"{vae}.log_likelihood")
        index = {m["name"]: m for m in http.get_model_repository_index()}
        http.unload_model(vae)
        http_unready = http.is_model_ready(f"{vae}.log_likelihood")
        with pytest.raises(GenserveError) as unknown:
            client.load_model("no-such-model")
        with pytest.raises(InferenceServerException) as parameters:
            grpc_oip.load_model(vae, config=json.dumps({"max_batch_size": 4}))
        after = {m.name: m.state for m in client.models()}
    assert listed[MODEL].state == "READY" and listed[vae].state == "UNAVAILABLE" and not listed[vae].versions
    assert not_loaded.value.code == grpc.StatusCode.NOT_FOUND and "not loaded" in not_loaded.value.message
    assert loaded.state == "READY" and loaded.versions == (1,) and score.log_prob.shape == (2,)
    assert health == "SERVING" and unloaded.state == "UNAVAILABLE" and health_after == "NOT_SERVING"
    assert grpc_ready and not grpc_unready and http_ready and not http_unready
    assert index[f"{vae}.log_likelihood"]["state"] == "READY"
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND and "no model folder" in unknown.value.message
    assert "INVALID_ARGUMENT" in str(parameters.value.status()) and "parameters" in parameters.value.message()
    assert after[MODEL] == "READY" and after[vae] == "UNAVAILABLE"


def test_an_explicit_load_that_fails_keeps_the_loaded_version_serving(engine_config, repo_copy, serve) -> None:
    cfg = explicit(engine_config, repo_copy)
    with serve(cfg) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        with Load(f"127.0.0.1:{srv.port}") as load:
            load.wait_for(20)
            copy_version(repo_copy, MODEL, 1, 2, corrupt=True)
            with pytest.raises(GenserveError) as failed:
                client.load_model(MODEL)
            load.wait_for(20)
        status = next(m for m in client.models() if m.name == MODEL)
    assert load.failures == [] and load.versions == {1}
    assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 2" in failed.value.message and "versions 1 keep serving" in failed.value.message
    assert status.state == "READY" and status.versions == (1,)


def test_load_and_unload_are_refused_unless_model_control_is_explicit(engine_config, repo_copy, serve) -> None:
    cfg = replace(engine_config, repo=repo_copy)
    with serve(cfg) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        with pytest.raises(GenserveError) as load:
            client.load_model(MODEL)
        with pytest.raises(GenserveError) as unload:
            client.unload_model(MODEL)
        with pytest.raises(InferenceServerException) as oip:
            triton_grpc.InferenceServerClient(f"127.0.0.1:{srv.port}").unload_model(MODEL)
        still = client.log_likelihood(MODEL, X, seed=1)
    for e in (load.value, unload.value):
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "--model-control-mode explicit" in e.message
    assert "FAILED_PRECONDITION" in str(oip.value.status()) and still.log_prob.shape == (2,)


@pytest.mark.parametrize("processes", [1, 2], ids=["1 process", "2 processes"])
def test_model_control_settings_are_checked(engine_config, repo_copy, processes: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_control"):
        replace(engine_config, poll_s=1.0)
    with pytest.raises(ValueError, match="model_control must be one of"):
        replace(engine_config, model_control="sometimes")
    with pytest.raises(ValueError, match="load_models"):
        replace(engine_config, load_models=MODEL)
    assert replace(engine_config, model_control="poll").poll_s == 5.0
    # One process raises the ValueError; `genserve serve --processes 2` exits with it before its ready line.
    with pytest.raises(ValueError if processes == 1 else AssertionError, match="no-such-model"):
        with serving(replace(explicit(engine_config, repo_copy), load_models="no-such-model"), processes,
                     tmp_path / "refused.log"):
            pass
    with serving(replace(explicit(engine_config, repo_copy), load_models="*"), processes, tmp_path / "server.log") \
            as srv, Client(f"127.0.0.1:{srv.port}") as client:
        states = {m.state for m in client.models()}
    assert states == {"READY"}


# One process only: it reads the warm-up counters of the in-process Engine, which a subprocess cannot show.
def test_warm_up_runs_every_graph_before_a_version_serves(engine_config, repo_copy, repo_models) -> None:
    set_config(repo_copy, "digits-vae", warmup=False)
    cfg = replace(engine_config, repo=repo_copy)
    with BackgroundServer(cfg) as srv:
        engine = srv.server.engine
        calls = {name: engine.get_model(name).warmup_calls for name in repo_models}
        graphs = {name: {g.name for g in engine.get_model(name).manifest.graphs} for name in repo_models}
        with Client(f"127.0.0.1:{srv.port}") as client:
            serving = client.info("digits-vae").serving
    for name in repo_models:
        if name == "digits-vae":
            assert calls[name] == {} and serving["warmup"] is False
        else:  # every graph ran at least once (the operations, then a full batch where shapes are fixed)
            assert set(calls[name]) == graphs[name] and min(calls[name].values()) >= 1, (name, calls[name])


def test_settings_come_from_the_environment_between_the_file_and_the_flags(tmp_path: Path, monkeypatch) -> None:
    """Containers configure with GENSERVE_<SETTING>: over the TOML file, under the flags; typed; typos refused."""
    from genserve.server.cli import _arguments, build_config

    toml = tmp_path / "server.toml"
    toml.write_text('repo = "from-file"\nport = 1111\nhttp_port = 2222\n')
    env = {"GENSERVE_PORT": "3333", "GENSERVE_OPEN_HEALTH": "false", "GENSERVE_MAX_QUEUE_DELAY_MS": "0.5",
           "GENSERVE_SERVER": "client-side:8500", "GENSERVE_MY_TOKENS": "abc"}
    cfg = ServerConfig.from_toml(toml, {"http_port": 4444}, environ=env, token_env="GENSERVE_MY_TOKENS")
    assert (cfg.port, cfg.http_port, cfg.open_health, cfg.max_queue_delay_ms) == (3333, 4444, False, 0.5)
    assert str(cfg.repo) == "from-file"
    with pytest.raises(ValueError, match="workers: input should be a valid integer, got True"):
        ServerConfig.from_toml(toml, {"workers": True})  # typed values must have the type already
    with pytest.raises(ValueError, match="GENSERVE_PROT is not a server setting"):
        ServerConfig.from_toml(toml, environ={"GENSERVE_PROT": "1"})
    with pytest.raises(ValueError, match="GENSERVE_PORT='eighty': port: input should be a valid integer"):
        ServerConfig.from_toml(toml, environ={"GENSERVE_PORT": "eighty"})
    # inline_call_us: unset (None, measured at start) by default and from an empty variable; a number otherwise
    assert ServerConfig.from_toml(toml).inline_call_us is None
    assert ServerConfig.from_toml(toml, environ={"GENSERVE_INLINE_CALL_US": ""}).inline_call_us is None
    assert ServerConfig.from_toml(toml, environ={"GENSERVE_INLINE_CALL_US": "300"}).inline_call_us == 300.0
    with pytest.raises(ValueError, match="inline_call_us must be a finite number >= 0, got -1"):
        ServerConfig.from_toml(toml, {"inline_call_us": -1.0})
    parser = argparse.ArgumentParser()
    _arguments(parser)
    assert build_config(parser.parse_args(["--repo", "r", "--inline-call-us", "0"])).inline_call_us == 0.0
    monkeypatch.setenv("GENSERVE_REPO", str(tmp_path))
    assert build_config(parser.parse_args([])).repo == tmp_path  # `genserve serve` with no flags
