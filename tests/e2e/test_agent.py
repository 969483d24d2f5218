"""The host agent (``stratavault agent``): commands handed to it by clients that set
STRATAVAULT_AGENT run as they do alone (output, exit codes, relative paths, Ctrl-C), its
memory of key derivations never opens a slot the passphrase no longer opens, and without
a usable agent a command simply runs in its client."""

from __future__ import annotations

import array
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stratavault.cli._agent import KeyMemory
from stratavault.repo import KdfParams
from tests.e2e.conftest import Cli, Result
from tests.e2e.test_prune import tree_digest, write_tree

_EXE = str(Path(sys.executable).with_name("stratavault"))


@dataclass
class Agent:
    socket: Path
    log: Path
    proc: subprocess.Popen[str]

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def pids(self, command: str) -> list[int]:
        """Processes the agent forked for ``command`` (its log says so)."""
        found = (re.search(rf"{command}.* in process (\d+)$", line) for line in self.lines())
        return [int(m.group(1)) for m in found if m]


def _start_agent(cli: Cli, folder: Path, *args: str) -> Agent:
    folder.mkdir(mode=0o700, exist_ok=True)
    sock, log = folder / "agent.sock", folder / "agent.log"
    proc = subprocess.Popen(
        [_EXE, "agent", "--socket", str(sock), "--json", *args],
        env={**os.environ, **cli.env}, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())  # once the modules are loaded
    assert ready == {"message_type": "agent", "socket": str(sock)}
    return Agent(sock, log, proc)


@pytest.fixture
def agent(cli: Cli, tmp_path: Path) -> Iterator[Agent]:
    started = _start_agent(cli, tmp_path / "agent")
    yield started
    started.proc.send_signal(signal.SIGTERM)
    assert started.proc.wait(30) == 0
    assert not started.socket.exists()


def _via(agent: Agent) -> dict[str, str]:
    return {"STRATAVAULT_AGENT": str(agent.socket)}


def _run(cli: Cli, *args: str | Path, env: dict[str, str]) -> Result:
    """The console script without a controlling terminal (the agent serves no other)."""
    return cli.subprocess(*args, env=env, detached=True)


def test_commands_run_in_the_agent_as_they_do_alone(cli: Cli, agent: Agent, tmp_path: Path) -> None:
    assert cli("init").code == 0
    src = tmp_path / "src"
    digest = write_tree(src, 1, files=5, size=70_000)
    res = _run(cli, "backup", "files", src, "--json", env=_via(agent))
    assert res.code == 0, res.err
    assert res.json_lines()[-1]["message_type"] == "summary"
    assert agent.pids("backup files")
    alone = cli.subprocess("snapshots", "--json")
    served = _run(cli, "snapshots", "--json", env=_via(agent))
    assert served.out == alone.out and served.err == alone.err == ""
    # The client's working folder: a relative target lands below it.
    proc = subprocess.run(
        [_EXE, "restore", "latest", "--target", "out"], cwd=tmp_path,
        env={**os.environ, **cli.env, **_via(agent)}, capture_output=True, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(tmp_path / "out" / src.relative_to("/")) == digest
    assert len(agent.pids("restore")) == 1
    # Errors: the client's exit code and its stderr, nothing on stdout.
    res = _run(cli, "cat", "snapshot", "nonexistent", env=_via(agent))
    assert res.code == 2 and res.out == "" and "expected 'latest'" in res.err
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    res = cli.subprocess(
        "snapshots", env={**_via(agent), "STRATAVAULT_PASSWORD_FILE": str(wrong)}, detached=True
    )
    assert res.code == 3 and "wrong passphrase" in res.err


def test_a_remembered_derivation_never_opens_a_changed_slot(
    cli: Cli, agent: Agent, tmp_path: Path
) -> None:
    assert cli("init").code == 0
    assert _run(cli, "snapshots", env=_via(agent)).code == 0
    remembered = [line for line in agent.lines() if "remembering a key derivation" in line]
    assert len(remembered) == 1
    assert _run(cli, "snapshots", env=_via(agent)).code == 0  # the same passphrase: remembered
    assert [line for line in agent.lines() if "remembering" in line] == remembered
    new = tmp_path / "new-pass"
    new.write_text("another passphrase\n")
    res = cli.subprocess(
        "key", "passwd", "--new-password-file", new, env=_via(agent), detached=True
    )
    assert res.code == 0, res.err
    res = _run(cli, "snapshots", env=_via(agent))  # the old one, remembered
    assert res.code == 3 and "wrong passphrase" in res.err
    res = cli.subprocess(
        "snapshots", env={**_via(agent), "STRATAVAULT_PASSWORD_FILE": str(new)}, detached=True
    )
    assert res.code == 0, res.err


def _serving(cli: Cli, agent: Agent, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """``serve-nbd`` (which runs until Ctrl-C) started through the agent and serving: the
    client, and the agent's process running the command."""
    assert cli("init").code == 0
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(1 << 20))
    assert cli("backup", "image", image).code == 0
    client = subprocess.Popen(
        [_EXE, "serve-nbd", "latest", "--socket", str(tmp_path / "nbd.sock"), "--json"],
        env={**os.environ, **cli.env, **_via(agent)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert client.stdout is not None
    assert json.loads(client.stdout.readline())["message_type"] == "serving"
    (pid,) = agent.pids("serve-nbd")
    return client, pid


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def test_ctrl_c_in_the_client_stops_the_command_as_alone(
    cli: Cli, agent: Agent, tmp_path: Path
) -> None:
    client, pid = _serving(cli, agent, tmp_path)
    client.send_signal(signal.SIGINT)
    _out, err = client.communicate(timeout=60)
    # serve-nbd ends with 0 on Ctrl-C while it serves; 130 when the signal comes between
    # printing its line and waiting (alone as well)
    assert client.returncode in (0, 130), err
    _wait_gone(pid)
    assert not (tmp_path / "nbd.sock").exists()
    # A command that Ctrl-C interrupts (here in its password command) exits 130.
    marker = f"sleep 29.{os.getpid()}{int(time.time() * 1000) % 100000}"
    script = tmp_path / "slow-password"
    script.write_text(f"#!/bin/sh\n{marker}\n")
    script.chmod(0o755)
    client = subprocess.Popen(
        [_EXE, "snapshots", "--password-command", str(script)],
        env={**os.environ, **cli.env, **_via(agent)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not _processes_with(marker):
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.05)
    client.send_signal(signal.SIGINT)
    _out, err = client.communicate(timeout=60)
    assert client.returncode == 130 and "interrupted" in err, err
    for sleeper in _processes_with(marker):
        _wait_gone(sleeper)


def _processes_with(command: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            if entry.name.isdigit() and argv == command.encode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_killed_client_stops_its_command(cli: Cli, agent: Agent, tmp_path: Path) -> None:
    client, pid = _serving(cli, agent, tmp_path)
    client.kill()
    client.wait()
    _wait_gone(pid)  # it took the client's end for Ctrl-C
    assert not (tmp_path / "nbd.sock").exists()
    assert _locks(cli) == []


def _locks(cli: Cli) -> list[Path]:
    folder = cli.repo / "locks"
    return list(folder.iterdir()) if folder.exists() else []


def test_without_a_usable_agent_commands_run_in_the_client(
    cli: Cli, agent: Agent, tmp_path: Path
) -> None:
    assert cli("init").code == 0
    res = cli.subprocess(
        "snapshots", env={"STRATAVAULT_AGENT": str(tmp_path / "none.sock")}, detached=True
    )
    assert res.code == 0, res.err
    # Another user cannot reach the agent (its folder is 0700): runs alone, as that user.
    res = cli.subprocess("--version", env=_via(agent), as_user="nobody")
    assert res.code == 0 and res.out.startswith("stratavault ")
    assert not agent.pids("--version")
    assert [line for line in agent.lines() if "in process" in line] == []


def test_a_second_agent_on_the_same_socket_is_refused(cli: Cli, agent: Agent) -> None:
    res = cli.subprocess("agent", "--socket", agent.socket)
    assert res.code == 2 and "another agent is listening" in res.err
    assert agent.proc.poll() is None


def test_an_open_socket_folder_is_refused(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    res = cli.subprocess("agent", "--socket", folder / "agent.sock")
    assert res.code == 2 and "closed to others" in res.err


def test_key_memory_forgets_after_its_time_and_keeps_nothing_with_ttl_0() -> None:
    now = [0.0]
    memory = KeyMemory(10, clock=lambda: now[0])
    kdf = KdfParams.fast()
    tag = memory.tag(kdf, b"salt", b"pass")
    assert tag != memory.tag(kdf, b"salt", b"pass2") != memory.tag(kdf, b"salt2", b"pass")
    assert tag != KeyMemory(10).tag(kdf, b"salt", b"pass")  # a secret of each agent
    memory.store(tag + b"k" * 32)
    assert memory.lookup(tag) == b"k" * 32
    now[0] = 10.0
    assert memory.lookup(tag) is None
    memory.expire()
    assert len(memory) == 0
    never = KeyMemory(0)
    never.store(tag + b"k" * 32)
    assert len(never) == 0


def _client(cli: Cli, agent: Agent, *args: str | Path, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [_EXE, *map(str, args)], env={**os.environ, **cli.env, **_via(agent)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        **popen,
    )  # fmt: skip


def test_a_client_with_fewer_privileges_or_another_priority_runs_alone(
    cli: Cli, agent: Agent
) -> None:
    """Same user, but without capabilities, or niced: the agent refuses (it would run the
    command with its own), and the command runs in the client."""
    assert cli("init").code == 0
    for prefix, differs in (
        (["setpriv", "--bounding-set=-all", "--inh-caps=-all"], "CapBnd"),
        (["nice", "-n", "5"], "nice"),
    ):
        proc = subprocess.run(
            [*prefix, _EXE, "snapshots", "--json"], env={**os.environ, **cli.env, **_via(agent)},
            capture_output=True, text=True, check=False, start_new_session=True,
        )  # fmt: skip
        assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr
        refused = [line for line in agent.lines() if "refused a command" in line]
        assert refused and differs in refused[-1]
    assert not agent.pids("snapshots")


def test_bad_requests_do_not_end_the_agent(cli: Cli, agent: Agent) -> None:
    for body in (b"[]", b'{"argv": [1, 2]}', b"[" * 100_000, b"\xff"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(agent.socket))
        data = len(body).to_bytes(4, "big") + body
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        sock.recv(100)
        sock.close()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(agent.socket))  # says nothing: dropped after 2 s
    assert cli("init").code == 0
    assert _run(cli, "snapshots", env=_via(agent)).code == 0
    silent.close()
    assert agent.proc.poll() is None and agent.pids("snapshots")


def test_exit_codes_descriptors_and_ignored_signals_as_alone(
    cli: Cli, agent: Agent, tmp_path: Path
) -> None:
    assert cli("init").code == 0
    # A write error on stdout is not lost.
    with open("/dev/full", "w") as full:
        alone = subprocess.run([_EXE, "snapshots"], env={**os.environ, **cli.env}, stdout=full)
        served = subprocess.run(
            [_EXE, "snapshots"], env={**os.environ, **cli.env, **_via(agent)}, stdout=full,
            start_new_session=True,
        )  # fmt: skip
    assert alone.returncode != 0 and served.returncode != 0  # 1, or 120 at the final flush
    # A descriptor besides the standard ones (a password file as /dev/fd/N).
    read_end, write_end = os.pipe()
    os.write(write_end, cli.password_file.read_bytes())
    os.close(write_end)
    proc = _client(
        cli, agent, "snapshots", "--password-file", f"/dev/fd/{read_end}", pass_fds=(read_end,)
    )
    os.close(read_end)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # A command killed by a signal: 128 + its number, as alone.
    proc = _client(cli, agent, "snapshots", "--password-command", "kill -9 $PPID")
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL
    # SIGHUP ignored by the client (nohup) is ignored by its command too.
    script = tmp_path / "slow"
    script.write_text(f"#!/bin/sh\nsleep 1\ncat {cli.password_file}\n")
    script.chmod(0o755)
    before = len(agent.pids("snapshots"))
    proc = _client(
        cli, agent, "snapshots", "--password-command", script,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while len(agent.pids("snapshots")) <= before:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGHUP)
    os.kill(agent.pids("snapshots")[-1], signal.SIGHUP)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_a_stopped_agent_leaves_the_command_to_its_client(cli: Cli, agent: Agent) -> None:
    assert cli("init").code == 0
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        res = _run(cli, "snapshots", "--json", env=_via(agent))
        assert res.code == 0 and res.json() == [], res.err
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    time.sleep(0.5)  # it takes the abandoned request now, and runs nothing for it
    assert _run(cli, "snapshots", env=_via(agent)).code == 0


def test_an_agent_ending_leaves_a_newer_agents_socket(cli: Cli, tmp_path: Path) -> None:
    first = _start_agent(cli, tmp_path / "agent")
    first.socket.unlink()
    second = _start_agent(cli, tmp_path / "agent", "-q")
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    assert second.socket.exists()
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(30) == 0 and not second.socket.exists()


def test_a_command_from_a_terminal_runs_in_its_client(cli: Cli, agent: Agent) -> None:
    """It may prompt on its terminal or be stopped with Ctrl-Z: the agent's processes
    have no terminal, so the client keeps it."""
    assert cli("init").code == 0
    main, tty = pty.openpty()
    name = os.ttyname(tty)

    def take_terminal() -> None:  # a session of its own whose controlling terminal is tty
        os.setsid()
        os.close(os.open(name, os.O_RDWR))

    proc = subprocess.run(
        [_EXE, "snapshots", "--json"], env={**os.environ, **cli.env, **_via(agent)},
        capture_output=True, text=True, check=False, preexec_fn=take_terminal,
    )  # fmt: skip
    os.close(main)
    os.close(tty)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr
    assert not agent.pids("snapshots")
