"""docker-compose.yml's wiring, checked without a Docker engine.

The file must validate against the compose specification, and what its containers run must
match the project: every ``kvcluster ...`` command parses with the real CLI parser, the
config files it names load, the Redis URL in the environment is the variable the config
loader reads and points at the Redis service, the Ray head's port is the one the workers and
the client use, every Ray driver runs on a Ray node, and the Dockerfile ships every package
and file those commands need. (tests/cluster/test_compose_equivalent.py runs the same
commands as local processes.)
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from kvcluster.cli import build_parser
from kvcluster.config import KVClusterConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
#: Commands that open a Ray driver connection (``kvcluster COMMAND``).
DRIVER_COMMANDS = {"up", "down", "status", "demo"}
#: The variable tests/cluster/test_remote_cluster.py reads for the Ray address.
TEST_ADDRESS_VAR = "KVCLUSTER_TEST_ADDRESS"


@dataclass(frozen=True)
class Step:
    """One simple command of a service: ``argv``, and where it came from (for messages)."""

    service: str
    origin: str  # "command" or "healthcheck"
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.service} {self.origin}: {shlex.join(self.argv)}"


def _split_shell(script: str) -> list[list[str]]:
    """Simple commands of a ``bash -c`` script, split at ``&&``, ``||``, ``;`` and ``|``."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _simple_commands(argv: list[str]) -> list[list[str]]:
    if len(argv) >= 3 and argv[0] in ("bash", "sh") and argv[1] == "-c":
        commands = _split_shell(argv[2])
    else:
        commands = [argv]
    # `exec cmd` runs cmd.
    return [c[1:] if c[0] == "exec" and len(c) > 1 else c for c in commands]


def _as_argv(value: Any) -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), value
    return list(value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # resolves <<: merge keys
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def steps(services: dict[str, dict[str, Any]]) -> list[Step]:
    found = []
    for name, service in services.items():
        if "command" in service:
            for argv in _simple_commands(_as_argv(service["command"])):
                found.append(Step(name, "command", tuple(argv)))
        health = service.get("healthcheck", {}).get("test")
        if health:
            argv = _as_argv(health)
            if argv[0] == "CMD-SHELL":
                commands = _split_shell(argv[1])
            else:
                commands = [argv[1:] if argv[0] == "CMD" else argv]
            found += [Step(name, "healthcheck", tuple(c)) for c in commands]
    return found


def _kvcluster_steps(steps: list[Step]) -> Iterator[tuple[Step, argparse.Namespace]]:
    parser = build_parser()
    for step in steps:
        if step.argv[0] != "kvcluster":
            continue
        try:
            args = parser.parse_args(list(step.argv[1:]))
        except SystemExit:
            pytest.fail(f"{step}: the kvcluster CLI rejects these arguments (see stderr above)")
        yield step, args


def _ray_start(step: Step) -> argparse.Namespace | None:
    """Options of a ``ray start`` step (the ones the wiring depends on), else None."""
    if step.argv[:2] != ("ray", "start"):
        return None
    parser = argparse.ArgumentParser(prog="ray start", add_help=False)
    parser.add_argument("--head", action="store_true")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--address")
    parser.add_argument("--block", action="store_true")
    options, _ = parser.parse_known_args(list(step.argv[2:]))
    return options


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


# --- the file against the specification -------------------------------------------------------


def _check_jsonschema() -> str:
    path = Path(sys.executable).parent / "check-jsonschema"
    assert path.exists(), f"{path} missing: install the dev extra (pip install -e '.[dev]')"
    return str(path)


def test_validates_against_the_compose_specification() -> None:
    result = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  redis:\n    image: redis:7.2\n    restart_policy: sometimes\n")
    result = subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(broken)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and "restart_policy" in result.stdout + result.stderr


# --- services, images, dependencies, health checks --------------------------------------------


def test_services_and_dependencies(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "ray-head", "client"} <= set(services)
    workers = [n for n in services if n.startswith("ray-worker")]
    assert len(workers) == 2, workers
    for name, service in services.items():
        depends = service.get("depends_on", {})
        names = depends if isinstance(depends, list) else list(depends)
        unknown = [d for d in names if d not in services]
        assert not unknown, f"{name} depends on unknown service(s) {unknown}"
        assert name not in names, f"{name} depends on itself"
    assert services["client"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["client"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["ray-head"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_health_checks_exist_for_redis_and_the_ray_head(services: dict[str, dict[str, Any]]) -> None:
    for name in ("redis", "ray-head"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test, f"{name} has no health check"
    assert _as_argv(services["redis"]["healthcheck"]["test"]) == ["CMD", "redis-cli", "ping"]


def test_kvcluster_containers_are_built_from_this_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if name == "redis":
            assert service["image"].startswith("redis:")
            continue
        build = service.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context == ".", f"{name} is not built from the repository root ({build!r})"
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / dockerfile).is_file()
        # Ray puts its object store in /dev/shm; Docker's default 64 MB is too small.
        assert service.get("shm_size"), f"{name} runs Ray without a larger shm_size"
        env = _environment(service)
        assert env.get("RAY_AUTH_MODE") == "disabled", f"{name}: Ray token auth is not disabled"


# --- commands against the CLI and the config --------------------------------------------------


def test_kvcluster_commands_parse_with_the_cli(steps: list[Step]) -> None:
    parsed = {(s.service, s.origin, args.command): args for s, args in _kvcluster_steps(steps)}
    assert set(parsed) >= {("ray-head", "command", "up"), ("ray-head", "healthcheck", "status")}, (
        f"expected `kvcluster up` in ray-head's command and `kvcluster status` in its health "
        f"check; found {sorted(parsed)}"
    )
    up = parsed["ray-head", "command", "up"]
    assert (up.config, up.address) == ("configs/compose.yaml", "auto")
    status = parsed["ray-head", "healthcheck", "status"]
    assert (status.config, status.address) == ("configs/compose.yaml", "auto")
    assert callable(up.handler) and callable(status.handler)


def test_referenced_config_files_exist_and_load(steps: list[Step]) -> None:
    configs = {args.config for _, args in _kvcluster_steps(steps) if getattr(args, "config", None)}
    for step in steps:
        if "--config" in step.argv:
            configs.add(step.argv[step.argv.index("--config") + 1])
    assert configs == {"configs/compose.yaml"}
    for path in configs:
        assert (ROOT / path).is_file(), f"{path} is referenced by docker-compose.yml but missing"
        config = load_config(ROOT / path, apply_env=False)
        assert isinstance(config, KVClusterConfig)


def test_redis_url_variable_is_the_loaders_and_names_the_redis_service(
    services: dict[str, dict[str, Any]],
) -> None:
    redis_command = _as_argv(services["redis"]["command"])
    redis_port = int(redis_command[redis_command.index("--port") + 1]) if "--port" in redis_command else 6379
    config = load_config(ROOT / "configs/compose.yaml", apply_env=False)
    for name, service in services.items():
        if name == "redis":
            continue
        env = _environment(service)
        url = env.get("KVCLUSTER_REDIS_URL")
        assert url, f"{name} lacks KVCLUSTER_REDIS_URL"
        # The loader is what reads the variable: it must switch the registry to this URL.
        applied = config.with_env(env)
        assert (applied.registry.backend, applied.registry.url) == ("redis", url)
        parsed = urlparse(url)
        assert (parsed.scheme, parsed.hostname, parsed.port or 6379) == ("redis", "redis", redis_port), (
            f"{name}: KVCLUSTER_REDIS_URL={url} does not point at the redis service on port {redis_port}"
        )
    # The file's own URL (used without the variable) names the service too.
    assert urlparse(config.registry.url).hostname == "redis"


def test_ray_head_port_matches_workers_and_client(
    steps: list[Step], services: dict[str, dict[str, Any]],
) -> None:
    heads = [(s, o) for s in steps if (o := _ray_start(s)) is not None and o.head]
    assert [s.service for s, _ in heads] == ["ray-head"]
    head_address = f"ray-head:{heads[0][1].port}"
    joins = [(s, o) for s in steps if (o := _ray_start(s)) is not None and not o.head]
    workers = [s.service for s, o in joins if o.block]
    assert sorted(workers) == ["ray-worker-1", "ray-worker-2"]
    for step, options in joins:
        assert options.address == head_address, f"{step}: joins {options.address}, head is {head_address}"
    # The client's drivers: --address of its commands and the tests' address variable.
    client_addresses = {
        s.argv[s.argv.index("--address") + 1] for s in steps
        if s.service == "client" and "--address" in s.argv
    }
    client_addresses.add(_environment(services["client"])[TEST_ADDRESS_VAR])
    assert client_addresses <= {head_address, "auto"} and client_addresses, client_addresses
    # `kvcluster up --wait-nodes N` waits for the head and every worker; the health check's
    # --min-nodes cannot ask for more node actors than that.
    [(_, up)] = [(s, a) for s, a in _kvcluster_steps(steps) if a.command == "up"]
    [(_, status)] = [(s, a) for s, a in _kvcluster_steps(steps) if a.command == "status"]
    assert up.wait_nodes == 1 + len(workers)
    assert 1 <= status.min_nodes <= up.wait_nodes


def test_every_ray_driver_runs_on_a_ray_node(
    steps: list[Step], services: dict[str, dict[str, Any]],
) -> None:
    """A Ray driver given a host:port address needs a raylet in its own container.

    Ray 2.x finds the raylet to attach a driver to among the local processes; in a container
    that never ran ``ray start`` it fails with "No node info found ... when trying to resolve
    node to connect to". Such a container must first join with ``ray start --address=HEAD
    --num-cpus=0`` (or use Ray Client, ``ray://``, which needs ``ray[client]``).
    """
    raylet_services = {s.service for s in steps if s.origin == "command" and _ray_start(s)}
    problems = []
    for step in steps:
        is_driver = (
            (step.argv[0] == "kvcluster" and len(step.argv) > 1 and step.argv[1] in DRIVER_COMMANDS)
            or ("--address" in step.argv and step.argv[:2] != ("ray", "start"))
            or ("pytest" in step.argv and TEST_ADDRESS_VAR in _environment(services[step.service]))
        )
        if not is_driver or step.service in raylet_services:
            continue
        address = (
            step.argv[step.argv.index("--address") + 1] if "--address" in step.argv
            else _environment(services[step.service]).get(TEST_ADDRESS_VAR, "")
        )
        if not address.startswith("ray://"):
            problems.append(f"{step} (address {address!r}) runs where no `ray start` ran")
    assert not problems, "Ray drivers without a local raylet:\n" + "\n".join(problems)


def test_client_runs_files_that_exist(steps: list[Step], services: dict[str, dict[str, Any]]) -> None:
    client = [s for s in steps if s.service == "client" and s.origin == "command"]
    scripts = [s.argv[1] for s in client if s.argv[0] == "python" and s.argv[1].endswith(".py")]
    tests = [a for s in client if "pytest" in s.argv for a in s.argv if a.endswith(".py")]
    assert scripts == ["examples/cluster_on_ray.py"]
    assert tests == ["tests/cluster/test_remote_cluster.py"]
    for path in scripts + tests:
        assert (ROOT / path).is_file(), f"the client container runs {path}, which does not exist"
    # The remote tests read the variables the client container sets.
    source = (ROOT / tests[0]).read_text(encoding="utf-8")
    for var in _environment(services["client"]):
        if var.startswith("KVCLUSTER_TEST_"):
            assert var in source, f"client sets {var}, which {tests[0]} never reads"


# --- the Dockerfile ---------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return data


def _top_level_packages() -> list[str]:
    pyproject = _pyproject()
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    roots = {p.split("*")[0].split(".")[0] for p in patterns}
    return sorted(r for r in roots if (ROOT / r / "__init__.py").is_file())


def test_dockerfile_copies_every_package_and_installs_with_constraints() -> None:
    instructions = _dockerfile_instructions()
    copied: list[str] = []
    install_at = None
    for index, (keyword, rest) in enumerate(instructions):
        if keyword == "COPY":
            copied += rest.split()[:-1]
        if keyword == "RUN" and "-e" in rest and "pip install" in rest and install_at is None:
            install_at = index
            run = rest
            assert re.search(r"pip install -c constraints\.txt torch\b", run), run
            assert re.search(r"pip install -c constraints\.txt -e \"?\.\[dev\]\"?", run), run
            # What the editable install needs is in the image before it runs.
            before = {c.rstrip("/") for c in copied}
            packages = _top_level_packages()
            assert packages == ["kvcluster", "routing", "tiers"]
            for needed in ("pyproject.toml", "setup.py", "constraints.txt", "README.md", *packages):
                assert needed in before, f"{needed} is copied after (or never before) pip install"
    assert install_at is not None, "the Dockerfile never runs pip install -e"
    compiler_at = next(
        (i for i, (keyword, rest) in enumerate(instructions) if keyword == "RUN" and re.search(r"apt-get install .*\bgcc\b", rest)),
        None,
    )
    assert compiler_at is not None and compiler_at < install_at, "no C compiler for the native accelerators before pip install"
    sources = {c.rstrip("/") for c in copied}
    # The compose commands run configs, examples and tests from the image.
    for needed in ("configs", "examples", "tests"):
        assert needed in sources, f"the Dockerfile does not COPY {needed}/"
    workdirs = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdirs, "no WORKDIR: the compose commands use paths relative to the project"
    assert instructions[0][0] == "FROM" and "python:3.11" in instructions[0][1]


def test_constraints_pin_torch() -> None:
    lines = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    assert any(re.fullmatch(r"torch==[0-9][0-9.]*", line.strip()) for line in lines)


def test_the_kvcluster_console_script_exists() -> None:
    pyproject = _pyproject()
    assert pyproject["project"]["scripts"]["kvcluster"] == "kvcluster.cli:main"
