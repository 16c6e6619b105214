"""Driving one docker-compose project of the testbed from the tests."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

ROOT = pathlib.Path(__file__).resolve().parents[2]
T = TypeVar("T")


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) when it works, else ``docker-compose`` (1.29); HVSOCK_COMPOSE
    overrides (e.g. "docker-compose")."""
    if override := os.environ.get("HVSOCK_COMPOSE"):
        return override.split()
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def docker_available() -> str | None:
    """None when a Docker engine answers and compose exists; else why not."""
    if shutil.which("docker") is None:
        return "no docker command"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        return f"no Docker engine answers ({info.stderr.strip().splitlines()[-1:]})"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


class ComposeProject:
    """One compose project (its own name, so it never touches a user's testbed)."""

    def __init__(self, project: str, env: dict[str, str]) -> None:
        command = compose_command()
        assert command is not None
        self.command = [
            *command,
            "--project-name",
            project,
            "--file",
            str(ROOT / "docker-compose.yml"),
        ]
        self.project = project
        self.env = {**os.environ, **env}

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.command, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.command, *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def exec(
        self, service: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("exec", "-T", service, *args, check=check, timeout=120)

    def hvsock(self, *args: str) -> Any:
        """``hvsock --json ARGS`` inside the host container (its token is in the environment)."""
        return json.loads(self.exec("host", "hvsock", "--json", *args).stdout)

    def logs(self, *services: str) -> str:
        return self.run("logs", "--no-color", *services, timeout=60).stdout

    def records(self, *services: str) -> list[dict[str, Any]]:
        """Every JSON line the testbed programs logged (they run with HVSOCK_TESTBED_JSON=1
        here), oldest first per service."""
        return json_lines(self.logs(*services))

    def results(self, *services: str) -> list[dict[str, Any]]:
        """The echo results among them."""
        return [r for r in self.records(*services) if r.get("kind") == "echo"]

    def container_ids(self, service: str) -> list[str]:
        return self.run("ps", "-q", service).stdout.split()


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among log lines (after compose's ``service_1  | `` prefix, if any)."""
    out = []
    for line in text.splitlines():
        payload = line if line.startswith("{") else line.partition("| ")[2]
        if payload.startswith("{"):
            try:
                out.append(json.loads(payload))
            except ValueError:
                continue  # a line of another program that happens to start with "{"
    return out


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 120, every: float = 0.5
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def ok_results(
    results: Sequence[dict[str, Any]], *, role: str, direction: str
) -> dict[str, dict[str, Any]]:
    """vm_id -> latest successful result of that role and direction."""
    return {
        r["vm_id"]: r
        for r in results
        if r.get("role") == role and r.get("direction") == direction and r.get("ok")
    }
