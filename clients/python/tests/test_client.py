"""baton_client against a real controller and agent: TLS, tokens, a SQLite file.

The binaries come from BATON_BIN_DIR (default: the workspace's target/debug); build
them first (`cargo build`).
"""

import os
import pathlib
import socket
import subprocess
import threading
import time

import pytest

import baton_client
from baton_client import Client, pb

ROOT = pathlib.Path(__file__).resolve().parents[3]
BIN = pathlib.Path(os.environ.get("BATON_BIN_DIR", ROOT / "target" / "debug"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baton(*args: str, env=None) -> str:
    out = subprocess.run([str(BIN / "baton"), *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"baton {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


def eventually(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except baton_client.BatonError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Controller:
    """A baton-controller process with TLS, on a SQLite file; restartable."""

    def __init__(self, d: pathlib.Path, pki: pathlib.Path):
        self.db = f"sqlite://{d / 'baton.db'}"
        self.addr = f"127.0.0.1:{free_port()}"
        self.log = d / "controller.log"
        self.args = [
            str(BIN / "baton-controller"),
            "--listen", self.addr,
            "--db", self.db,
            "--tls-cert", str(pki / "ctl.pem"),
            "--tls-key", str(pki / "ctl-key.pem"),
        ]
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("baton")
    pki = d / "pki"
    baton("certs", "ca", "--dir", str(pki))
    baton("certs", "issue", "--dir", str(pki), "--role", "controller", "--name", "ctl", "--host", "127.0.0.1")
    ctl = Controller(d, pki)
    admin = subprocess.run(
        [str(BIN / "baton-controller"), "bootstrap", "--db", ctl.db], capture_output=True, text=True, check=True
    ).stdout.strip()
    ctl.start()
    url, ca = f"https://{ctl.addr}", str(pki / "ca.pem")
    env = {"BATON_CONTROLLER": url, "BATON_TLS_CA": ca, "BATON_TOKEN": admin}
    client = Client(url, token=admin, ca=ca, reconnect_timeout=30)
    eventually("the controller", lambda: client.runs.list() is not None)
    join = baton("agents", "join-token", "--ttl", "10m", env=env)
    agent = subprocess.Popen(
        [str(BIN / "baton-agent"), "--controller", url, "--tls-ca", ca, "--name", "py1", "--slots", "2",
         "--work-dir", str(d / "agent")],
        env={**os.environ, "BATON_JOIN_TOKEN": join},
        stdout=subprocess.DEVNULL,
        stderr=open(d / "agent.log", "ab"),
    )
    eventually("the agent", lambda: any(
        a.name == "py1" and a.state == pb.AGENT_STATE_CONNECTED
        for a in client._call("ListAgents", pb.ListAgentsRequest()).agents
    ))
    yield {"client": client, "url": url, "ca": ca, "admin": admin, "env": env, "controller": ctl, "dir": d}
    agent.kill()
    ctl.kill()


SPEC = """
name: py
params: {who: {default: world}}
steps:
  - {id: hello, tool: shell, with: {run: 'echo hello $WHO; echo "greeting=hi $WHO" >> $BATON_OUTPUT'}, env: {WHO: '${{ params.who }}'}}
  - {id: after, needs: hello, tool: noop}
"""


def test_submit_yaml_with_params_and_wait(cluster):
    c = cluster["client"]
    run = c.submit(SPEC, params={"who": "ann"}, wait=True, labels={"suite": "py"}, priority=7)
    got = run.get()
    assert got.state == pb.RUN_STATE_SUCCEEDED
    assert got.priority == 7
    assert [s.id for s in got.steps] == ["hello", "after"]
    assert run.outputs()["hello"] == {"greeting": "hi ann"}
    assert run.state == "succeeded"
    logs = b"".join(ch.data for ch in c.logs(run.id, step="hello"))
    assert logs == b"hello ann\n"
    assert run.id in [r.id for r in c.runs.list(labels={"suite": "py"})]
    assert run.id in [r.id for r in c.runs.list(states=["succeeded"], workstream="py")]
    assert run.report()["run"]["id"] == run.id


def test_submit_a_dict_and_watch_every_event_in_order(cluster):
    c = cluster["client"]
    spec = {"name": "dict", "steps": [{"id": "a", "tool": "noop"}, {"id": "b", "tool": "noop", "needs": ["a"]}]}
    run = c.submit(spec)
    events = list(run.watch())
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind == "run_succeeded"
    assert {e.step_id for e in events if e.kind == "step_succeeded"} == {"a", "b"}


def test_a_repeated_request_id_returns_the_same_run(cluster):
    c = cluster["client"]
    first = c.submit(SPEC, request_id="py-req-1")
    again = c.submit(SPEC, request_id="py-req-1")
    assert first.id == again.id


def test_errors_name_what_was_wrong(cluster):
    c = cluster["client"]
    with pytest.raises(baton_client.InvalidArgument) as bad:
        c.submit("name: bad\nsteps:\n  - {id: a, tool: noop, needs: [nope]}\n", source="bad.yaml")
    assert 'step "a": depends on unknown step "nope"' in bad.value.message
    assert bad.value.message.startswith("bad.yaml:")
    with pytest.raises(baton_client.NotFound):
        c.run("0190aaaa-0000-7000-8000-000000000000").get()
    stranger = Client(cluster["url"], ca=cluster["ca"])
    with pytest.raises(baton_client.Unauthenticated):
        stranger.runs.list()
    reader = baton("tokens", "create", "--name", "py-reader", "--role", "reader", env=cluster["env"])
    with pytest.raises(baton_client.PermissionDenied):
        Client(cluster["url"], token=reader, ca=cluster["ca"]).submit(SPEC)


def test_follow_logs_and_cancel(cluster):
    c = cluster["client"]
    run = c.submit("name: long\nsteps:\n  - {id: s, tool: shell, with: {run: 'echo started; sleep 60'}}\n")
    chunks = c.logs(run.id, step="s", follow=True)
    assert next(chunks).data == b"started\n"
    assert run.cancel("enough") == pb.RUN_STATE_CANCELED
    assert list(chunks) == []
    assert run.state == "canceled"
    assert run.delete() > 0
    with pytest.raises(baton_client.NotFound):
        run.get()


def test_a_canceled_run_is_retried_and_watched_from_its_retry(cluster):
    c = cluster["client"]
    run = c.submit("name: again\nsteps:\n  - {id: s, tool: shell, with: {run: 'echo started; sleep 60'}}\n")
    chunks = c.logs(run.id, step="s", follow=True)
    assert next(chunks).data == b"started\n"
    assert run.cancel() == pb.RUN_STATE_CANCELED
    seq = run.retry()
    events = run.watch(from_seq=seq)
    first = next(events)
    assert (first.seq, first.kind) == (seq, "run_retried")
    assert run.state == "running"
    assert run.cancel() == pb.RUN_STATE_CANCELED
    assert [e.kind for e in events][-1] == "run_canceled"
    # Waiting on a retried run waits for its last end, not its first.
    run.retry()
    threading.Timer(0.5, lambda: run.cancel("again")).start()
    ended = run.wait()
    assert (ended.state, ended.reason) == (pb.RUN_STATE_CANCELED, "again")
    done = c.submit(SPEC, wait=True)
    with pytest.raises(baton_client.FailedPrecondition) as e:
        done.retry()
    assert "nothing to retry" in e.value.message


def test_a_rerun_reuses_upstream_outputs_and_links_back(cluster):
    c = cluster["client"]
    old = c.submit(SPEC, params={"who": "bo"}, wait=True)
    new = old.rerun("after")
    assert new.wait().state == pb.RUN_STATE_SUCCEEDED
    got = new.get()
    assert got.rerun_of == old.id
    assert [pb.StepState.Name(s.state) for s in got.steps] == ["STEP_STATE_REUSED", "STEP_STATE_SUCCEEDED"]
    assert new.outputs()["hello"] == {"greeting": "hi bo"}
    assert list(old.get().reruns) == [new.id]
    with pytest.raises(baton_client.NotFound):
        old.rerun("nope")


def test_an_approval_step_is_approved_with_its_inputs(cluster):
    c = cluster["client"]
    run = c.submit(
        "name: gated\nsteps:\n  - {id: gate, tool: approval, with: {inputs: {n: number}}}\n"
        "  - {id: after, needs: gate, tool: noop}\n"
    )
    deadline = time.monotonic() + 20
    while run.get().steps[0].state != pb.STEP_STATE_AWAITING_APPROVAL:
        assert time.monotonic() < deadline, "the step never awaited approval"
        time.sleep(0.05)
    run.approve("gate", comment="fine", inputs={"n": 3})
    assert run.wait().state == pb.RUN_STATE_SUCCEEDED
    assert run.outputs()["gate"] == {"n": 3, "approved_by": "token bootstrap", "comment": "fine"}


def test_watch_resumes_across_a_controller_restart(cluster):
    c, ctl = cluster["client"], cluster["controller"]
    gate = cluster["dir"] / "gate"
    spec = (
        "name: restart\nsteps:\n"
        f"  - {{id: wait, tool: shell, with: {{run: 'while [ ! -e {gate} ]; do sleep 0.05; done'}}}}\n"
        "  - {id: next, needs: wait, tool: noop}\n"
    )
    run = c.submit(spec)
    events = run.watch()
    seen = []
    for ev in events:
        seen.append(ev)
        if ev.kind == "attempt_started":
            break
    ctl.kill()
    ctl.start()
    gate.touch()
    seen.extend(events)
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1)), [(e.seq, e.kind) for e in seen]
    assert seen[-1].kind == "run_succeeded"


def test_bare_addresses_and_bad_urls():
    assert baton_client._url("ctl:7070", True) == ("ctl:7070", True)
    assert baton_client._url("http://ctl:7070/", True) == ("ctl:7070", False)
    with pytest.raises(ValueError):
        Client("ftp://ctl:7070")


def test_artifacts_are_listed_and_downloaded_checked(cluster, tmp_path):
    c = cluster["client"]
    spec = (
        "name: files\nsteps:\n"
        "  - {id: make, tool: shell, artifacts: ['out/*.txt'], with: {run: 'mkdir out && printf hi > out/a.txt'}}\n"
        "  - {id: read, needs: make, tool: shell, inputs: {from: make, artifacts: ['out/a.txt']}, with: {run: 'cat out/a.txt'}}\n"
    )
    run = c.submit(spec, wait=True)
    assert run.state == "succeeded", [(s.id, s.reason) for s in run.get().steps]
    [a] = run.artifacts()
    assert (a.step_id, a.path, a.size) == ("make", "out/a.txt", 2)
    [path] = run.download_artifacts(str(tmp_path))
    assert open(path).read() == "hi"
    assert path == str(tmp_path / "make" / "out" / "a.txt")
