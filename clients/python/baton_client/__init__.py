"""Python client of a Baton controller.

    from baton_client import Client

    client = Client("https://ctl.example:7070", token_file="~/.baton-token", ca="ca.pem")
    run = client.submit(open("build.yaml").read(), params={"target": "linux"})
    for event in run.watch():          # resumes after a dropped connection
        print(event.seq, event.kind, event.step_id)
    print(run.get().state)             # a baton.v1.Run message
    for chunk in client.logs(run.id, step="build", follow=True):
        print(chunk.data.decode(), end="")

Messages are the generated ones of package ``baton.v1`` (``baton_client.pb``); errors
are ``BatonError`` and its subclasses, each carrying the controller's message.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import yaml
from google.protobuf import json_format

from baton_client._pb.baton.v1 import api_pb2 as pb
from baton_client._pb.baton.v1 import api_pb2_grpc

__all__ = [
    "Client",
    "Run",
    "Runs",
    "BatonError",
    "InvalidArgument",
    "NotFound",
    "Unauthenticated",
    "PermissionDenied",
    "Unavailable",
    "FailedPrecondition",
    "pb",
    "TERMINAL",
]

#: Run states after which nothing more happens.
TERMINAL = frozenset({pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELED})

# Codes of a call that may be made again: the controller was not reached, or went away
# (it restarts, or leadership moves).
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


class BatonError(Exception):
    """A call the controller refused or could not answer."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidArgument(BatonError):
    """Bad input: an invalid spec (the message names the file, line and step), a bad param."""


class NotFound(BatonError):
    """No run, step, attempt or agent by that name."""


class Unauthenticated(BatonError):
    """No credential, or one the controller does not accept."""


class PermissionDenied(BatonError):
    """The credential's role does not allow the call."""


class Unavailable(BatonError):
    """No controller answered (for longer than the reconnect timeout, where retried)."""


class FailedPrecondition(BatonError):
    """The run is not in a state that allows the call: retrying one that succeeded,
    releasing one that is not quarantined, deleting one that has not ended."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def _error(e: grpc.RpcError) -> BatonError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return _ERRORS.get(code, BatonError)(details or str(code), code)


def _url(url: str, tls: bool) -> Tuple[str, bool]:
    """The target and whether to use TLS: ``https://`` TLS, ``http://`` plaintext, a bare
    ``host:port`` TLS when a CA or client certificate is given (as the ``baton`` CLI)."""
    url = url.strip()
    if url.startswith("https://"):
        return url[len("https://"):].rstrip("/"), True
    if url.startswith("http://"):
        return url[len("http://"):].rstrip("/"), False
    if "://" in url:
        raise ValueError(f"controller url {url!r}: the scheme must be http:// or https://")
    return url, tls


def _read(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(os.path.expanduser(path), "rb") as f:
        return f.read()


class Client:
    """A connection to a controller.

    ``url``: ``https://host:port`` (TLS), ``http://host:port``, or a bare ``host:port``
    (TLS when ``ca`` or ``cert`` is given). ``token`` or ``token_file``: the API token
    (``baton tokens create``). ``ca``: the CA certificate (PEM) that signed the
    controller's certificate (else the system's roots); ``cert`` and ``key``: a client
    certificate for mutual TLS. ``reconnect_timeout``: how long calls that may be
    repeated (submit, watch, follow) keep retrying while no controller answers.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:7070",
        token: Optional[str] = None,
        *,
        token_file: Optional[str] = None,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        reconnect_timeout: float = 60.0,
    ):
        if token is None and token_file is not None:
            token = _read(token_file).decode().strip()
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs both cert and key")
        target, secure = _url(url, ca is not None or cert is not None)
        options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        if secure:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
            )
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._stub = api_pb2_grpc.BatonServiceStub(self._channel)
        self.reconnect_timeout = reconnect_timeout
        self.url = url
        #: Runs: ``client.runs.list(...)``, ``client.runs.get(id)``.
        self.runs = Runs(self)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, request: Any, **kw: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, **kw)
        except grpc.RpcError as e:
            raise _error(e) from None

    def _retrying(self, attempt):
        """Calls ``attempt()`` until it returns, retrying transient failures with backoff
        for up to the reconnect timeout."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.2
        while True:
            try:
                return attempt()
            except grpc.RpcError as e:
                if e.code() not in _TRANSIENT or time.monotonic() + delay > deadline:
                    raise _error(e) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def submit(
        self,
        spec: Union[str, Mapping[str, Any]],
        params: Optional[Mapping[str, Any]] = None,
        *,
        wait: bool = False,
        name: str = "",
        labels: Optional[Mapping[str, str]] = None,
        source: str = "<python>",
        request_id: Optional[str] = None,
        priority: int = 0,
        no_cache: bool = False,
    ) -> "Run":
        """Starts a run of ``spec`` (YAML or JSON text, or a dict) and returns it.

        ``params`` are the spec's params (strings, numbers or booleans). The submit carries
        a request id (a new UUID unless given) and is retried while no controller answers:
        a retry whose first try did reach the controller returns that run, so no run is
        made twice. With ``wait``, returns once the run has ended (or is quarantined).
        ``priority`` (-1000 to 1000) puts its steps before lower ones' when agents' slots
        are scarce; ``no_cache`` runs every step whatever the step cache holds.
        """
        text = spec if isinstance(spec, str) else json.dumps(dict(spec))
        req = pb.SubmitRunRequest(
            spec=text,
            source=source,
            request_id=request_id or str(uuid.uuid4()),
            name=name,
            labels=dict(labels or {}),
            priority=priority,
            no_cache=no_cache,
        )
        if params:
            req.params.update(dict(params))
        resp = self._retrying(lambda: self._stub.SubmitRun(req, metadata=self._metadata))
        run = Run(self, resp.run_id)
        if wait:
            run.wait()
        return run

    def run(self, run_id: str) -> "Run":
        """A handle on a run by id (or a unique prefix of one); nothing is fetched yet."""
        return Run(self, run_id)

    def logs(
        self, run_id: str, step: Optional[str] = None, *, attempt: int = 0, follow: bool = False
    ) -> Iterator[pb.LogChunk]:
        """Output chunks of one step (its latest attempt, or ``attempt``) or of the whole
        run. With ``follow``, goes on until the step (or run) has ended, across
        reconnects: what was already yielded is not yielded again."""
        req = pb.GetLogsRequest(run_id=run_id, step_id=step or "", attempt=attempt, follow=follow)
        yielded: Dict[tuple, int] = {}
        deadline = None
        while True:
            seen: Dict[tuple, int] = {}
            try:
                for chunk in self._stub.GetLogs(req, metadata=self._metadata):
                    deadline = None
                    k = (chunk.step_id, chunk.attempt)
                    start = seen.get(k, 0)
                    seen[k] = start + len(chunk.data)
                    done = yielded.get(k, 0)
                    if seen[k] <= done:
                        continue
                    if done > start:
                        chunk.data = chunk.data[done - start:]
                    yielded[k] = seen[k]
                    yield chunk
                return
            except grpc.RpcError as e:
                if not follow or e.code() not in _TRANSIENT:
                    raise _error(e) from None
                deadline = deadline or time.monotonic() + self.reconnect_timeout
                if time.monotonic() > deadline:
                    raise _error(e) from None
                time.sleep(0.5)


class Runs:
    """The runs of a controller."""

    def __init__(self, client: Client):
        self._client = client

    def get(self, run_id: str) -> pb.Run:
        """A run with its steps and attempts."""
        return self._client._call("GetRun", pb.GetRunRequest(run_id=run_id)).run

    def list(
        self,
        *,
        states: Sequence[Union[int, str]] = (),
        workstream: str = "",
        labels: Optional[Mapping[str, str]] = None,
        limit: int = 50,
    ) -> List[pb.RunSummary]:
        """Runs, newest first: at most ``limit``, in one of ``states`` (``"failed"`` or
        ``pb.RUN_STATE_FAILED``), of ``workstream``, carrying all ``labels``."""
        codes = [pb.RunState.Value(f"RUN_STATE_{s.upper()}") if isinstance(s, str) else s for s in states]
        req = pb.ListRunsRequest(
            states=codes, workstream=workstream, labels=dict(labels or {}), page_size=min(limit, 1000)
        )
        runs: List[pb.RunSummary] = []
        while len(runs) < limit:
            page = self._client._call("ListRuns", req)
            runs.extend(page.runs)
            if not page.next_page_token:
                break
            req.page_token = page.next_page_token
        return runs[:limit]


class Run:
    """A run on the controller, by id."""

    def __init__(self, client: Client, run_id: str):
        self._client = client
        self.id = run_id

    def __repr__(self) -> str:
        return f"Run({self.id!r})"

    def get(self) -> pb.Run:
        """The run as it is now, with its steps and attempts."""
        return self._client.runs.get(self.id)

    @property
    def state(self) -> str:
        """The run's state now, by name: ``running``, ``succeeded``, ..."""
        return pb.RunState.Name(self.get().state)[len("RUN_STATE_"):].lower()

    def outputs(self) -> Dict[str, Any]:
        """Each step's outputs (its result) as Python values, by step id."""
        return {
            s.id: json_format.MessageToDict(s.result) for s in self.get().steps if s.HasField("result")
        }

    def watch(self, from_seq: int = 1, *, run_events_only: bool = False) -> Iterator[pb.RunEvent]:
        """The run's events from ``from_seq`` until the one that ends it. A dropped
        connection (the controller restarts, or another one takes the lead) is resumed
        after the last event yielded, so none is missed or repeated."""
        client = self._client
        next_seq = max(from_seq, 1)
        deadline = None
        while True:
            req = pb.WatchRunRequest(run_id=self.id, from_seq=next_seq, run_events_only=run_events_only)
            try:
                for ev in client._stub.WatchRun(req, metadata=client._metadata):
                    deadline = None
                    next_seq = ev.seq + 1
                    yield ev
                return
            except grpc.RpcError as e:
                if e.code() not in _TRANSIENT:
                    raise _error(e) from None
                deadline = deadline or time.monotonic() + client.reconnect_timeout
                if time.monotonic() > deadline:
                    raise _error(e) from None
                time.sleep(0.5)

    def wait(self) -> pb.Run:
        """Waits until the run has ended, or is quarantined (it then waits for an
        operator); returns it. (The watch ends after the run's last end: a retried
        run's log goes on past its first.)"""
        for ev in self.watch(run_events_only=True):
            if ev.kind == "run_quarantined":
                run = self.get()
                if run.state == pb.RUN_STATE_QUARANTINED:
                    return run
        return self.get()

    def cancel(self, reason: str = "", *, step: Optional[str] = None) -> int:
        """Cancels the run (or one step of it); returns the run's state after it."""
        req = pb.CancelRunRequest(run_id=self.id, reason=reason, step_id=step or "")
        return self._client._call("CancelRun", req).state

    def delete(self) -> int:
        """Deletes the run, finished, with its steps, attempts, events and output;
        returns the number of rows deleted."""
        return self._client._call("DeleteRun", pb.DeleteRunRequest(run_id=self.id)).rows

    def release(self, raise_budget: Optional[float] = None, raise_tokens: Optional[int] = None) -> int:
        """Resumes a quarantined run, with a new cost budget in dollars and a new token
        budget where given (a run held for passing its budget needs one above what it
        has cost); returns its state after it."""
        req = pb.ReleaseRunRequest(run_id=self.id)
        if raise_budget is not None:
            req.max_cost_usd = raise_budget
        if raise_tokens is not None:
            req.max_tokens = raise_tokens
        return self._client._call("ReleaseRun", req).state

    def approve(self, step: str, comment: str = "", inputs: Optional[Mapping[str, Any]] = None) -> int:
        """Approves approval step ``step`` with the values its ``with.inputs`` asks for;
        returns the run's state after it."""
        req = pb.DecideApprovalRequest(run_id=self.id, step_id=step, approve=True, comment=comment)
        if inputs:
            req.inputs.update(dict(inputs))
        return self._client._call("DecideApproval", req).state

    def reject(self, step: str, comment: str = "") -> int:
        """Rejects approval step ``step`` (it fails); returns the run's state after it."""
        req = pb.DecideApprovalRequest(run_id=self.id, step_id=step, approve=False, comment=comment)
        return self._client._call("DecideApproval", req).state

    def rerun(
        self,
        from_step: Optional[str] = None,
        *,
        only: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None,
    ) -> "Run":
        """A new run that repeats this one from ``from_step`` (that step and every step
        downstream of it run again) or, with ``only``, runs that step alone again; every
        other step that succeeded is reused with its outputs. ``params`` are set over
        this run's. Returns the new run."""
        if (from_step is None) == (only is None):
            raise ValueError("rerun: give from_step or only, not both")
        req = pb.RerunRunRequest(
            run_id=self.id, from_step=only or from_step, only=only is not None, request_id=str(uuid.uuid4())
        )
        if params:
            req.params.update(dict(params))
        return Run(self._client, self._client._call("RerunRun", req).run_id)

    def retry(self) -> int:
        """Runs a failed or canceled run again in place (its failed, canceled and
        skipped steps; succeeded ones keep their outputs); returns the sequence number
        of its ``run_retried`` event, to ``watch`` the retry from."""
        return self._client._call("RetryRun", pb.RetryRunRequest(run_id=self.id)).seq

    def artifacts(self) -> List[pb.ArtifactInfo]:
        """The files the run's steps left (``artifacts:`` in the spec)."""
        return list(self._client._call("ListArtifacts", pb.ListArtifactsRequest(run_id=self.id)).artifacts)

    def download_artifacts(self, directory: str) -> List[str]:
        """Fetches every artifact of the run into ``directory/STEP/PATH``, each checked
        against its size and SHA-256; returns the paths written."""
        written = []
        for a in self.artifacts():
            path = os.path.join(directory, a.step_id, *a.path.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            digest, size = hashlib.sha256(), 0
            req = pb.GetArtifactRequest(run_id=self.id, step_id=a.step_id, path=a.path)
            with open(path + ".part", "wb") as f:
                try:
                    for chunk in self._client._stub.GetArtifact(req, metadata=self._client._metadata):
                        digest.update(chunk.data)
                        size += len(chunk.data)
                        f.write(chunk.data)
                except grpc.RpcError as e:
                    raise _error(e) from None
            if size != a.size or digest.hexdigest() != a.sha256:
                os.remove(path + ".part")
                raise BatonError(f"{a.path} of step {a.step_id} arrived damaged: {size} bytes, sha256 {digest.hexdigest()}")
            os.replace(path + ".part", path)
            written.append(path)
        return written

    def report(self, fmt: str = "json") -> Union[str, Dict[str, Any]]:
        """The run's report: ``json`` (as a dict), ``md`` or ``html`` (as text)."""
        formats = {"json": pb.REPORT_FORMAT_JSON, "md": pb.REPORT_FORMAT_MARKDOWN, "html": pb.REPORT_FORMAT_HTML}
        if fmt not in formats:
            raise ValueError(f"report format {fmt!r}: one of json, md, html")
        content = self._client._call("GetReport", pb.GetReportRequest(run_id=self.id, format=formats[fmt])).content
        return json.loads(content) if fmt == "json" else content


def load_spec(text: str) -> Dict[str, Any]:
    """A spec's text (YAML or JSON) as a dict, to change before submitting."""
    return yaml.safe_load(text)
