"""No one let in: TLS and mutual TLS on the gRPC port, bearer tokens checked by an interceptor (counted, never
logged), health open for probes, the client and CLI end to end; and nothing in the project unpickles."""

from __future__ import annotations

import ast
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from ports import free_port
from supervised import Supervised, serving
from tls_certs import make_certificates

from genserve.clients.client import Client, GenserveError
from genserve.server.app import BackgroundServer
from genserve.server.config import ServerConfig
from genserve.v1 import service_pb2 as pb
from genserve.v1 import service_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
TOKENS = ("tok-A-9f3b2c1d8e7a6b5c4d3e2f1a", "tok-B-0a1b2c3d4e5f60718293a4b5")
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
LOADED = 'genserve_model_loaded{model="digits-ppca",version="1"} 1.0'


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def small_repo(repo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-ppca alone: the security tests need a real model, not every family."""
    repo = tmp_path_factory.mktemp("repo1")
    shutil.copytree(repo_dir / "digits-ppca", repo / "digits-ppca")
    return repo


def config(repo: Path, **kw: object) -> ServerConfig:
    return ServerConfig(repo=repo, port=0, metrics_port=0, provider="cpu", workers=1, grace_s=1.0, **kw)


def token_file(folder: Path, *tokens: str) -> Path:
    path = folder / "tokens"
    path.write_text("# genserve tokens\n\n" + "".join(f"{t}\n" for t in tokens))
    return path


@pytest.fixture(params=[1, 2], ids=["1 process", "2 processes"])
def processes(request: pytest.FixtureRequest) -> int:
    """Each server of these tests in one process, and as `genserve serve --processes 2` (issue 17)."""
    return request.param


def observed(cfg: ServerConfig, processes: int) -> ServerConfig:
    """With 2 processes, a /metrics port too: the refusal counter is read there, not from the Engine."""
    return cfg if processes == 1 else replace(cfg, metrics_port=free_port())


@pytest.fixture(scope="module", params=[1, 2], ids=["1 process", "2 processes"])
def secured(small_repo: Path, certs: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A server with TLS and two tokens (file); the DEBUG log of every logger is kept for the no-leak check
    (with 2 processes: the workers' DEBUG log, in their log file)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root, keep = logging.getLogger(), Keep(logging.DEBUG)
    old_level = root.level
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)
    tokens = token_file(tmp_path_factory.mktemp("tokens"), *TOKENS)
    cfg = config(small_repo, tls_cert=certs / "server.pem", tls_key=certs / "server.key", token_file=tokens)
    log = tmp_path_factory.mktemp("processes") / "server.log"
    try:
        with serving(observed(cfg, request.param), request.param, log, "--log-level", "DEBUG") as srv:
            srv.records = records
            yield srv
    finally:
        root.removeHandler(keep)
        root.setLevel(old_level)


def client(srv: BackgroundServer, certs: Path, **kw: object) -> Client:
    return Client(f"localhost:{srv.port}", tls_ca=certs / "ca.pem", retries=0, timeout=20, **kw)


def refused_count(srv: BackgroundServer | Supervised) -> float:
    if isinstance(srv, Supervised):
        return srv.metric("genserve_unauthenticated_total")
    return srv.server.metrics.value("genserve_unauthenticated_total") or 0.0


def test_tls_and_a_valid_token_are_served(secured: BackgroundServer, certs: Path) -> None:
    for token in TOKENS:
        with client(secured, certs, token=token) as c:
            assert [m.name for m in c.models()] == ["digits-ppca"]
            x = c.sample("digits-ppca", 3, seed=1)
            assert x.shape == (3, 8, 8)
            assert np.isfinite(c.log_likelihood("digits-ppca", x).log_prob).all()
            assert c.sample("digits-ppca", 300, seed=1).shape == (300, 8, 8)  # SampleStream
    assert "tls=on auth=token" in ready(secured)


def ready(srv: BackgroundServer | Supervised) -> str:
    from genserve.server.app import ready_line

    return srv.ready if isinstance(srv, Supervised) else ready_line(srv.server)


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", TOKENS[0][:-1], TOKENS[0] + "x", "Bearer"],
                         ids=["missing", "wrong", "prefix", "longer", "scheme-only"])
def test_calls_without_a_valid_token_are_unauthenticated_and_counted(secured: BackgroundServer, certs: Path,
                                                                     token: str | None) -> None:
    before = refused_count(secured)
    with client(secured, certs, token=token) as c:
        calls = [c.models, lambda: c.info("digits-ppca"), lambda: c.sample("digits-ppca", 2, seed=1),
                 lambda: c.sample("digits-ppca", 300, seed=1),  # SampleStream (server streaming)
                 lambda: c.score_stream("digits-ppca", np.zeros((10, 8, 8), np.float32)),  # bidi stream
                 c.reload]
        for call in calls:
            with pytest.raises(GenserveError) as e:
                call()
            assert e.value.code == UNAUTHENTICATED, e.value
            message = e.value.message
            assert "authorization: Bearer" in message and "--token" in message, message
            assert ("no bearer token" if token is None else "not valid") in message
            if token:
                assert token not in message.replace("Bearer <token>", "")
    assert refused_count(secured) - before == len(calls)


def test_a_wrong_authorization_scheme_is_refused(secured: BackgroundServer, certs: Path) -> None:
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{secured.port}", creds) as channel:
        stub = service_pb2_grpc.GenerativeServiceStub(channel)
        for value in (f"Basic {TOKENS[0]}", TOKENS[0], f"bearer {TOKENS[0]}"):
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", value)], timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            # The scheme is case-insensitive (RFC 7235); anything but Bearer is refused.
            assert code == (grpc.StatusCode.OK if value.startswith("bearer") else UNAUTHENTICATED), value


def test_health_is_open_for_probes_and_reflection_is_not(secured: BackgroundServer, certs: Path) -> None:
    before = refused_count(secured)
    with client(secured, certs) as c:
        assert c.health() == "SERVING"
        assert c.health("digits-ppca") == "SERVING"
    assert refused_count(secured) == before
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{secured.port}", creds) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert e.value.code() == UNAUTHENTICATED
        got = list(stub.ServerReflectionInfo(iter([request]), timeout=10,
                                             metadata=[("authorization", f"Bearer {TOKENS[1]}")]))
        names = {s.name for s in got[0].list_services_response.service}
        assert "genserve.v1.GenerativeService" in names


def test_plaintext_and_untrusting_clients_fail(secured: BackgroundServer) -> None:
    with Client(f"localhost:{secured.port}", token=TOKENS[0], retries=0, timeout=10) as c:
        with pytest.raises(GenserveError) as e:
            c.models()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    with Client(f"localhost:{secured.port}", tls=True, token=TOKENS[0], retries=0, timeout=10) as c:
        with pytest.raises(GenserveError) as e:  # the system roots do not trust the test CA
            c.models()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_tokens_never_reach_the_logs(secured: BackgroundServer, certs: Path) -> None:
    with client(secured, certs, token=TOKENS[0]) as c:
        c.models()
    with client(secured, certs, token="leak-check-" + TOKENS[1][::-1]) as c, pytest.raises(GenserveError):
        c.models()
    if isinstance(secured, Supervised):  # the workers' log, and the settings file they were started with
        text = secured.log.read_text()
        assert "bearer token(s) accepted" in text, "the server log was not kept"
        text += secured.log.with_suffix(".toml").read_text()
    else:
        records = secured.records
        assert any("bearer token(s) accepted" in r.getMessage() for r in records), "the server log was not kept"
        text = "\n".join(f"{r.getMessage()} {r.args} {r.exc_text or ''}" for r in records)
        cfg = secured.server.cfg
        text += repr(cfg) + str(cfg.to_dict())
    text += ready(secured)
    for token in (*TOKENS, TOKENS[1][::-1]):
        assert token not in text


def test_token_file_rotates_on_reload(small_repo: Path, tmp_path: Path, processes: int) -> None:
    path = token_file(tmp_path, "old-token-aaaaaaaaaaaaaaaa")
    with serving(config(small_repo, token_file=path), processes, tmp_path / "server.log") as srv:
        target = f"127.0.0.1:{srv.port}"
        with Client(target, token="old-token-aaaaaaaaaaaaaaaa", retries=0) as c:
            assert c.models()
        token_file(tmp_path, "new-token-bbbbbbbbbbbbbbbb")
        with Client(target, token="old-token-aaaaaaaaaaaaaaaa", retries=0) as c:
            c.reload()  # the old token is still valid for the call that rotates it
            with pytest.raises(GenserveError) as e:
                c.models()
            assert e.value.code == UNAUTHENTICATED
        with Client(target, token="new-token-bbbbbbbbbbbbbbbb", retries=0) as c:
            assert c.models()
            path.write_text("# emptied by mistake\n")
            c.reload()  # a token file without tokens keeps the ones in use (no lock-out, no open door)
            assert c.models()


def test_tokens_from_an_environment_variable(small_repo: Path, monkeypatch: pytest.MonkeyPatch, processes: int,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("GENSERVE_TEST_TOKENS", f"{TOKENS[0]}, {TOKENS[1]}")
    with serving(config(small_repo, token_env="GENSERVE_TEST_TOKENS"), processes, tmp_path / "server.log") as srv:
        for token in TOKENS:
            with Client(f"127.0.0.1:{srv.port}", token=token, retries=0) as c:
                assert c.models()
        with Client(f"127.0.0.1:{srv.port}", retries=0) as c, pytest.raises(GenserveError) as e:
            c.models()
        assert e.value.code == UNAUTHENTICATED


def test_mutual_tls_rejects_clients_without_a_trusted_certificate(small_repo: Path, certs: Path, processes: int,
                                                                  tmp_path: Path) -> None:
    cfg = config(small_repo, tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                 tls_client_ca=certs / "ca.pem")
    with serving(cfg, processes, tmp_path / "server.log") as srv:
        assert "tls=mutual auth=off" in ready(srv)
        target = f"localhost:{srv.port}"
        with Client(target, tls_ca=certs / "ca.pem", tls_cert=certs / "client.pem",
                    tls_key=certs / "client.key", retries=0) as c:
            assert c.sample("digits-ppca", 2, seed=0).shape == (2, 8, 8)
        for extra in ({}, {"tls_cert": certs / "stranger.pem", "tls_key": certs / "stranger.key"}):
            with Client(target, tls_ca=certs / "ca.pem", retries=0, timeout=10, **extra) as c:
                with pytest.raises(GenserveError) as e:
                    c.models()
                assert e.value.code == grpc.StatusCode.UNAVAILABLE, extra


def test_bad_security_settings_fail_at_start(small_repo: Path, certs: Path, tmp_path: Path, processes: int) -> None:
    with pytest.raises(ValueError, match="tls_key"):
        config(small_repo, tls_cert=certs / "server.pem")
    with pytest.raises(ValueError, match="tls_client_ca"):
        config(small_repo, tls_client_ca=certs / "ca.pem")
    with pytest.raises(ValueError, match="token_env"):
        config(small_repo, token_env="NOT A NAME")
    cases = [
        (config(small_repo, token_file=tmp_path / "absent"), "cannot read"),
        (config(small_repo, token_file=token_file(tmp_path, )), "no token"),
        (config(small_repo, token_env="GENSERVE_SURELY_UNSET_VAR"), "not set"),
        (config(small_repo, tls_cert=certs / "server.key", tls_key=certs / "server.key"), "certificate"),
        (config(small_repo, tls_cert=certs / "server.pem", tls_key=certs / "server.pem"), "private key"),
    ]
    (tmp_path / "spaces").write_text("two words\n")
    cases.append((config(small_repo, token_file=tmp_path / "spaces"), "entry 1"))
    # One process raises the ValueError; `genserve serve --processes 2` exits with it before its ready line.
    for cfg, words in cases:
        with pytest.raises(ValueError if processes == 1 else AssertionError, match=words) as e:
            with serving(cfg, processes, tmp_path / "server.log"):
                pass
        assert "two words" not in str(e.value)


def test_serve_and_client_cli_end_to_end(small_repo: Path, certs: Path, tmp_path: Path, processes: int) -> None:
    """`genserve serve --tls-cert --tls-key --token-env` in a process, `genserve models/sample` with --tls-ca
    and --token-file / $GENSERVE_TOKEN; the server's DEBUG log on stderr holds no token."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SERVE_TOKENS": TOKENS[0]}
    env.pop("GENSERVE_TOKEN", None)
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "genserve.server.cli", "--repo", str(small_repo), "--port", "0",
           "--metrics-port", str(metrics_port), "--provider", "cpu", "--log-level", "DEBUG",
           "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
           "--token-env", "SERVE_TOKENS", "--no-open-health", "--processes", str(processes)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("genserve: serving"), log.read_text()[-2000:]
        assert "tls=on auth=token" in line
        port = int(re.search(r" port=(\d+)", line).group(1))
        (tmp_path / "tok").write_text(TOKENS[0] + "\n")

        def cli(*args: str, token_env: str | None = None) -> subprocess.CompletedProcess:
            e = {**env, "GENSERVE_TOKEN": token_env} if token_env else env
            return subprocess.run([sys.executable, "-m", "genserve.app.cli", *args, "--server",
                                   f"localhost:{port}", "--tls-ca", str(certs / "ca.pem")],
                                  capture_output=True, text=True, env=e, timeout=60)

        ok = cli("models", "--token-file", str(tmp_path / "tok"))
        assert ok.returncode == 0 and "digits-ppca" in ok.stdout, ok.stderr
        ok = cli("sample", "digits-ppca", "-n", "4", "--out", str(tmp_path / "x.npy"), token_env=TOKENS[0])
        assert ok.returncode == 0, ok.stderr
        assert np.load(tmp_path / "x.npy").shape == (4, 8, 8)
        bad = cli("models", "--token", "not-the-token-123456789")
        assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr and "Bearer" in bad.stderr
        # --no-open-health: probes need the token too
        health = subprocess.run([sys.executable, "-c", (
            "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g\n"
            f"c = grpc.secure_channel('localhost:{port}', grpc.ssl_channel_credentials(open(sys.argv[1], 'rb')"
            ".read()))\n"
            "try:\n    g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=10); print('OK')\n"
            "except grpc.RpcError as e:\n    print(e.code().name)\n"), str(certs / "ca.pem")],
            capture_output=True, text=True, timeout=60)
        assert health.stdout.strip() == "UNAUTHENTICATED", health.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    text = log.read_text()
    assert "DEBUG" in text and "bearer token(s) accepted" in text
    assert TOKENS[0] not in text


# -- nothing unpickles ---------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the proof would be the marker file existing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    import torch

    from genserve.training.checkpoint import FORMAT, read_checkpoint

    marker = tmp_path / "pwned"
    crafted = {tmp_path / "torch-save.pt": lambda p: torch.save({"format": FORMAT, "x": Payload(marker)}, p),
               tmp_path / "raw-pickle.pt": lambda p: p.write_bytes(pickle.dumps({"format": FORMAT,
                                                                                  "x": Payload(marker)}))}
    for path, write in crafted.items():
        write(path)
        assert not marker.exists()
        with pytest.raises(ValueError, match="not a readable genserve checkpoint"):
            read_checkpoint(path)
        assert not marker.exists(), f"{path.name}: loading the checkpoint ran the pickled payload"
    # the same payload through plain pickle does run: the test would notice a loader that unpickles
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


def test_the_repository_loader_reads_only_json_and_onnx(small_repo: Path, tmp_path: Path) -> None:
    """Load a model version under an audit hook: the files Python opens are JSON and ONNX only, and no
    pickle class lookup happens; a pickle disguised as a graph (with a matching sha256) fails to load."""
    from genserve.core.manifest import read_manifest, write_manifest
    from genserve.server.config import ServingSettings
    from genserve.server.repository import LoadFailed, load_version, sha256_file

    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    opened: list[str] = []
    events: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if not active[0]:
            return
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            opened.append(os.fsdecode(args[0]))
        elif event.startswith(("pickle.", "marshal.loads")):
            events.append(event)

    sys.addaudithook(hook)  # audit hooks cannot be removed: ``active`` switches this one off
    try:
        model = load_version(repo, "digits-ppca", 1, ServingSettings(provider="cpu"), 1)
    finally:
        active[0] = False
    assert model.operations
    read = [p for p in opened if Path(p).resolve().is_relative_to(repo.resolve()) and Path(p).is_file()]
    assert read, "the audit hook saw no repository file"
    assert {Path(p).suffix for p in read} <= {".json", ".onnx"}, read
    assert not events, events

    marker = tmp_path / "pwned"
    folder = repo / "digits-ppca" / "1"
    manifest = read_manifest(folder / "manifest.json")
    graph = folder / manifest.graphs[0].file
    graph.write_bytes(pickle.dumps(Payload(marker)))
    manifest.graphs[0].sha256 = sha256_file(graph)
    write_manifest(manifest, folder / "manifest.json")
    with pytest.raises(LoadFailed, match="ONNX Runtime cannot load"):
        load_version(repo, "digits-ppca", 1, ServingSettings(provider="cpu"), 1)
    assert not marker.exists()  # loading is synchronous: had the payload run, the marker would be there


UNPICKLING = re.compile(r"\b(pickle|cPickle|dill|joblib|shelve|marshal)\b")


def test_no_serving_or_client_code_can_unpickle() -> None:
    """The server, core and client sources import no unpickler and call np.load only without allow_pickle."""
    offenders = []
    for folder in ("server", "core", "clients"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "generated" in path.parts:
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    if any(UNPICKLING.search(n) for n in names):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names}")
                if isinstance(node, ast.Call):
                    name = ast.unparse(node.func)
                    if name.endswith(("torch.load", "np.load", "numpy.load")):
                        pickle_kw = [k for k in node.keywords if k.arg == "allow_pickle"]
                        if any(not (isinstance(k.value, ast.Constant) and k.value.value is False)
                               for k in pickle_kw) or name.endswith("torch.load"):
                            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders


def test_open_reflection_and_closed_health_by_config(small_repo: Path, tmp_path: Path, processes: int) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    cfg = config(small_repo, token_file=token_file(tmp_path, TOKENS[0]), open_health=False, open_reflection=True)
    with serving(observed(cfg, processes), processes, tmp_path / "server.log") as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        got = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]),
                                                                                          timeout=10))
        assert got[0].list_services_response.service
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert e.value.code() == UNAUTHENTICATED
        assert refused_count(srv) == 1


def scrape(url: str, ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> str:
    import ssl
    import urllib.request

    context = None
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
    with urllib.request.urlopen(url, timeout=10, context=context) as answer:
        return answer.read().decode()


def test_metrics_over_https_and_mutual_tls(small_repo: Path, certs: Path, processes: int, tmp_path: Path) -> None:
    """metrics_tls: /metrics speaks HTTPS with the server's certificate; with a client CA, a scraper without a
    trusted client certificate is turned away. Plain HTTP gets no metrics either way."""
    import urllib.error

    def config(repo: Path, **kw: object) -> ServerConfig:  # with a metrics port, unlike the module's
        return ServerConfig(repo=repo, port=0, provider="cpu", workers=1, grace_s=1.0, **kw)

    tls = {"tls_cert": certs / "server.pem", "tls_key": certs / "server.key", "metrics_tls": True,
           "metrics_port": free_port()}
    with serving(config(small_repo, **tls), processes, tmp_path / "server.log") as srv:
        port = srv.metrics_port
        assert f"metrics=https://127.0.0.1:{port}/metrics" in ready(srv)
        # A sample, not a family name: --processes N (multiprocess mode) lists no family before its first value.
        assert LOADED in scrape(f"https://localhost:{port}/metrics", ca=certs / "ca.pem")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            scrape(f"http://localhost:{port}/metrics")
    with serving(config(small_repo, tls_client_ca=certs / "ca.pem", **{**tls, "metrics_port": free_port()}),
                 processes, tmp_path / "server2.log") as srv:
        url = f"https://localhost:{srv.metrics_port}/metrics"
        client_cert = (certs / "client.pem", certs / "client.key")
        assert LOADED in scrape(url, ca=certs / "ca.pem", cert=client_cert)
        for cert in (None, (certs / "stranger.pem", certs / "stranger.key")):
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                scrape(url, ca=certs / "ca.pem", cert=cert)
    with pytest.raises(ValueError, match="metrics_tls"):
        config(small_repo, metrics_tls=True, metrics_port=free_port())
