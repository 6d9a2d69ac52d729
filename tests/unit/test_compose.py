"""compose.yaml and deploy/ checked against the code, with no Docker engine.

Nothing here starts a container: the files are parsed and compared with what the code declares —
the services registered under the ``cuneiform.services`` entry point, their settings classes, the
connection settings, and the metrics ``cuneiform_core.observability`` exports — so that a renamed
setting, a new service without a compose block or a dashboard query on a metric that does not exist
fails here instead of on someone's ``docker compose up``.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import cuneiform_core.observability  # noqa: F401  (registers the metrics in prometheus_client's REGISTRY)
import yaml
from cuneiform_core.settings import ConnectionSettings, ServiceSettings
from cuneiform_core.topology import MAX_MESSAGE_BYTES
from prometheus_client import REGISTRY
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = "deploy/Dockerfile"
ENTRY_POINT_GROUP = "cuneiform.services"

#: Compose services built from deploy/Dockerfile whose package does not exist yet. Their blocks are
#: checked against the conventions (env prefix, ServiceSettings' fields) instead of a real settings
#: class. Remove a name as soon as its package registers a `cuneiform.services` entry point.
PLANNED_SERVICES: set[str] = set()

#: CUNEIFORM_* variables read outside the settings classes (cuneiform_core.settings reads it itself).
ENV_OUTSIDE_SETTINGS = {"CUNEIFORM_ENV_FILE"}

#: Connection settings a container must set: their defaults point at 127.0.0.1, i.e. at nothing.
REQUIRED_CONNECTION_FIELDS = ("nats_url", "pg_dsn", "s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket")


# --- reading the files -----------------------------------------------------------------------------------


@cache
def load_yaml(relative: str) -> Any:
    return yaml.safe_load((ROOT / relative).read_text())


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = load_yaml("compose.yaml")["services"]
    return services


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment as a dict, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def uses_dockerfile(service: dict[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == DOCKERFILE


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def env_prefix_for(name: str) -> str:
    return f"CUNEIFORM_{name.upper().replace('-', '_')}_"


def registered_services() -> dict[str, type[ServiceSettings]]:
    """Name → settings class of every service package installed in this environment."""
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}


def planned_settings(name: str) -> type[ServiceSettings]:
    """What a planned service's settings class will at least have: ServiceSettings under its prefix."""

    class PlannedSettings(ServiceSettings):
        service_name: ClassVar[str] = name
        model_config = SettingsConfigDict(env_prefix=env_prefix_for(name), extra="ignore", frozen=True)

    camel = "".join(part.capitalize() for part in name.split("-"))
    PlannedSettings.__name__ = f"{camel}Settings (planned: ServiceSettings' fields only)"
    return PlannedSettings


def cuneiform_services() -> dict[str, tuple[dict[str, Any], type[ServiceSettings]]]:
    """Compose services built from deploy/Dockerfile, each with the settings class it reads."""
    registered = registered_services()
    found = {}
    for name, service in compose_services().items():
        if uses_dockerfile(service) and (name in registered or name in PLANNED_SERVICES):
            found[name] = (service, registered.get(name) or planned_settings(name))
    return found


def own_env(service: dict[str, Any], settings_class: type[ServiceSettings], field: str) -> str | None:
    prefix = settings_class.model_config.get("env_prefix") or ""
    return environment(service).get(f"{prefix}{field.upper()}")


def connection_settings(service: dict[str, Any]) -> ConnectionSettings:
    env = environment(service)
    values = {
        name: env[f"CUNEIFORM_{name.upper()}"]
        for name in ConnectionSettings.model_fields
        if f"CUNEIFORM_{name.upper()}" in env
    }
    return ConnectionSettings(_env_file=None, **values)


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host path relative to the repository, container path) of each bind mount."""
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                yield str(volume["source"]).removeprefix("./"), str(volume["target"])
            continue
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):  # otherwise a named volume
            yield source.removeprefix("./"), target


def container_path_of(service_name: str, host_path: str) -> str:
    for source, target in bind_mounts(compose_services()[service_name]):
        if source.rstrip("/") == host_path:
            return target
    raise AssertionError(f"compose service {service_name} does not mount ./{host_path}")


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = {int(str(port).rsplit(":", 1)[-1].split("/")[0]) for port in service.get("ports") or []}
    return ports | {int(port) for port in service.get("expose") or []}


# --- (b) every env var a service gets is a real setting -------------------------------------------------


def env_problems(compose_service: dict[str, Any], settings_class: type[ServiceSettings]) -> list[str]:
    """What is wrong with the CUNEIFORM_* variables a compose service sets, as actionable messages.

    A variable under the service's own env prefix must name a field of its settings class; any other
    CUNEIFORM_* variable must name a ConnectionSettings field. The values must also parse.
    """
    name = settings_class.service_name
    prefix = settings_class.model_config.get("env_prefix") or ""
    own_fields = {f"{prefix}{field.upper()}": field for field in settings_class.model_fields}
    connection_fields = {f"CUNEIFORM_{field.upper()}": field for field in ConnectionSettings.model_fields}
    own_values: dict[str, str] = {}
    connection_values: dict[str, str] = {}
    problems = []
    for var, value in environment(compose_service).items():
        key = var.upper()
        if not key.startswith("CUNEIFORM_") or key in ENV_OUTSIDE_SETTINGS:
            continue
        if key in own_fields:
            own_values[own_fields[key]] = value
        elif key in connection_fields:
            connection_values[connection_fields[key]] = value
        elif prefix and key.startswith(prefix):
            problems.append(
                f"compose service {name} sets {var} which is not a setting of {settings_class.__name__}; "
                f"fields are: {', '.join(sorted(own_fields))}"
            )
        else:
            problems.append(
                f"compose service {name} sets {var} which is neither a connection setting "
                f"({', '.join(sorted(connection_fields))}) nor under its own prefix {prefix}"
            )
    for cls, values in ((settings_class, own_values), (ConnectionSettings, connection_values)):
        try:
            cls(_env_file=None, **values)
        except ValidationError as error:
            problems.append(f"compose service {name}: {cls.__name__} rejects the values compose sets: {error}")
    return problems


class ExampleWorkerSettings(ServiceSettings):
    """A realistic service's settings, to test env_problems without depending on a real service."""

    service_name: ClassVar[str] = "example-worker"
    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_EXAMPLE_WORKER_", extra="ignore", frozen=True)

    batch_size: int = 500
    flush_interval: float = 0.5


def test_env_problems_accepts_real_settings() -> None:
    service = {
        "environment": {
            "CUNEIFORM_NATS_URL": "nats://nats:4222",
            "CUNEIFORM_S3_SECURE": "false",
            "CUNEIFORM_EXAMPLE_WORKER_BATCH_SIZE": 1000,
            "CUNEIFORM_EXAMPLE_WORKER_METRICS_PORT": "9199",
            "PYTHONUNBUFFERED": "1",
        }
    }
    assert env_problems(service, ExampleWorkerSettings) == []


def test_env_problems_reports_a_misspelled_service_setting_with_the_real_names() -> None:
    service = {"environment": ["CUNEIFORM_EXAMPLE_WORKER_BATCH_SIZE=1000", "CUNEIFORM_EXAMPLE_WORKER_BATCH_SIZ=1000"]}
    [problem] = env_problems(service, ExampleWorkerSettings)
    assert "CUNEIFORM_EXAMPLE_WORKER_BATCH_SIZ which is not a setting of ExampleWorkerSettings" in problem
    assert "CUNEIFORM_EXAMPLE_WORKER_BATCH_SIZE" in problem and "CUNEIFORM_EXAMPLE_WORKER_FLUSH_INTERVAL" in problem


def test_env_problems_reports_a_misspelled_connection_setting_and_a_bad_value() -> None:
    service = {"environment": {"CUNEIFORM_NATS_ULR": "nats://nats:4222", "CUNEIFORM_EXAMPLE_WORKER_BATCH_SIZE": "lots"}}
    problems = env_problems(service, ExampleWorkerSettings)
    assert len(problems) == 2, problems
    assert "CUNEIFORM_NATS_ULR which is neither a connection setting" in problems[0]
    assert "CUNEIFORM_NATS_URL" in problems[0]
    assert "ExampleWorkerSettings rejects" in problems[1] and "batch_size" in problems[1]


def test_every_cuneiform_service_sets_only_real_settings() -> None:
    problems = [p for service, cls in cuneiform_services().values() for p in env_problems(service, cls)]
    assert not problems, "\n".join(problems)


# --- (a) compose services and the installed service packages agree ---------------------------------------


def test_every_registered_service_has_a_compose_service() -> None:
    services = compose_services()
    for name, settings_class in registered_services().items():
        assert name in services, (
            f"service package {name} is registered under {ENTRY_POINT_GROUP} but compose.yaml has no "
            f"service {name!r}: add a block with `<<: *service` (see the header of compose.yaml)"
        )
        assert uses_dockerfile(services[name]), f"compose service {name} must be built from {DOCKERFILE}"
        assert command_of(services[name]) == [f"cuneiform-{name}"], (
            f'compose service {name} must run command: ["cuneiform-{name}"], not {command_of(services[name])}'
        )
        assert entry_points(group="console_scripts", name=f"cuneiform-{name}"), (
            f"package of {name} declares no console script cuneiform-{name} in [project.scripts]"
        )
        assert issubclass(settings_class, ServiceSettings), f"{name}'s entry point must name a ServiceSettings subclass"
        assert settings_class.service_name == name, (
            f"{settings_class.__name__}.service_name is {settings_class.service_name!r}, its entry point is {name!r}"
        )
        assert settings_class.model_config.get("env_prefix") == env_prefix_for(name), (
            f"{settings_class.__name__} must use env_prefix={env_prefix_for(name)!r} (the compose env names rely on it)"
        )


def test_every_service_built_from_the_dockerfile_is_registered_or_planned() -> None:
    registered = registered_services()
    for name, service in compose_services().items():
        if uses_dockerfile(service):
            assert name in registered or name in PLANNED_SERVICES, (
                f"compose service {name} is built from {DOCKERFILE} but no installed package registers it under "
                f"{ENTRY_POINT_GROUP}: add the package (and `uv sync`), or list it in PLANNED_SERVICES"
            )
    for name in PLANNED_SERVICES:
        assert name not in registered, f"{name} is now registered: remove it from PLANNED_SERVICES in {__name__}"
        assert name in compose_services(), f"PLANNED_SERVICES names {name}, which compose.yaml does not define"


def test_cuneiform_services_wait_for_infrastructure_and_are_health_checked() -> None:
    services = compose_services()
    for name, (service, _) in cuneiform_services().items():
        assert command_of(service) == [f"cuneiform-{name}"], f"compose service {name} must run cuneiform-{name}"
        depends_on = service.get("depends_on") or {}
        for infra in ("nats", "postgres"):
            assert depends_on.get(infra, {}).get("condition") == "service_healthy", (
                f"compose service {name} must depend on {infra} with condition: service_healthy"
            )
            assert "healthcheck" in services[infra], f"{infra} needs a healthcheck for service_healthy to mean anything"
        assert "healthcheck" in service, f"compose service {name} has no healthcheck"
        assert "/healthz" in json.dumps(service["healthcheck"]["test"]), f"{name}'s healthcheck must hit /healthz"


# --- (c) connection settings point at the compose infrastructure -----------------------------------------


def minio_buckets_created() -> set[str]:
    init = compose_services()["minio-init"]
    script = " ".join(str(part) for key in ("entrypoint", "command") for part in (init.get(key) or []))
    return set(re.findall(r"\bmc\s+mb\s+(?:--?[\w-]+\s+)*[\w.-]+/([a-z0-9][a-z0-9.-]*)", script))


def nats_client_port() -> int:
    match = re.search(r"^\s*port\s*[:=]\s*(\d+)", (DEPLOY / "nats/nats.conf").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 4222


def test_cuneiform_services_set_every_required_connection_setting() -> None:
    for name, (service, _) in cuneiform_services().items():
        missing = [
            f"CUNEIFORM_{f.upper()}"
            for f in REQUIRED_CONNECTION_FIELDS
            if f"CUNEIFORM_{f.upper()}" not in environment(service)
        ]
        assert not missing, f"compose service {name} does not set {', '.join(missing)} (use `<<: *cuneiform-env`)"


def test_connection_settings_point_at_the_compose_servers_with_their_credentials() -> None:
    services = compose_services()
    postgres_env = environment(services["postgres"])
    minio_env = environment(services["minio"])
    buckets = minio_buckets_created()
    for name, (service, _) in cuneiform_services().items():
        settings = connection_settings(service)

        nats = urlsplit(settings.nats_url)
        assert (nats.scheme, nats.hostname, nats.port) == ("nats", "nats", nats_client_port()), (
            f"compose service {name}: CUNEIFORM_NATS_URL={settings.nats_url} should be nats://nats:{nats_client_port()}"
        )

        pg = urlsplit(settings.pg_dsn)
        user = postgres_env.get("POSTGRES_USER", "postgres")
        expected_pg = (user, postgres_env["POSTGRES_PASSWORD"], postgres_env.get("POSTGRES_DB", user))
        assert pg.scheme in ("postgresql", "postgres") and pg.hostname == "postgres" and pg.port in (None, 5432), (
            f"compose service {name}: CUNEIFORM_PG_DSN={settings.pg_dsn} should point at postgres:5432"
        )
        assert (pg.username, pg.password, pg.path.lstrip("/")) == expected_pg, (
            f"compose service {name}: CUNEIFORM_PG_DSN user/password/database differ from the postgres service's "
            f"POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB {expected_pg}"
        )

        assert settings.s3_endpoint == "minio:9000", (
            f"compose service {name}: CUNEIFORM_S3_ENDPOINT={settings.s3_endpoint} should be minio:9000 (host:port)"
        )
        assert not settings.s3_secure, (
            f"compose service {name}: MinIO serves plain HTTP here, set CUNEIFORM_S3_SECURE=false"
        )
        assert (settings.s3_access_key, settings.s3_secret_key) == (
            minio_env["MINIO_ROOT_USER"],
            minio_env["MINIO_ROOT_PASSWORD"],
        ), f"compose service {name}: CUNEIFORM_S3_ACCESS_KEY/SECRET_KEY differ from minio's MINIO_ROOT_USER/PASSWORD"
        assert settings.s3_bucket in buckets, (
            f"compose service {name}: CUNEIFORM_S3_BUCKET={settings.s3_bucket} but minio-init creates {sorted(buckets)}"
        )


def test_nats_accepts_the_contracts_largest_message() -> None:
    text = (DEPLOY / "nats/nats.conf").read_text()
    match = re.search(r"^\s*max_payload\s*[:=]\s*(\d+)\s*$", text, re.MULTILINE)
    assert match, "deploy/nats/nats.conf must set max_payload in bytes"
    assert int(match.group(1)) >= MAX_MESSAGE_BYTES, f"max_payload must be at least {MAX_MESSAGE_BYTES} (topology)"
    assert re.search(r"^\s*store_dir\s*[:=]\s*/data/", text, re.MULTILINE), (
        "JetStream must store under the /data volume"
    )


def test_nats_file_store_holds_the_streams_storage_budget() -> None:
    text = (DEPLOY / "nats/nats.conf").read_text()
    match = re.search(r"^\s*max_file_store\s*[:=]\s*(\d+)\s*(?:#.*)?$", text, re.MULTILINE)
    assert match, "deploy/nats/nats.conf must set jetstream.max_file_store in bytes"
    max_file_store = int(match.group(1))
    for name, (service, _) in cuneiform_services().items():
        budget = connection_settings(service).nats_storage_gib * 1024**3
        assert max_file_store > budget, (
            f"compose service {name}: the streams reserve CUNEIFORM_NATS_STORAGE_GIB={budget / 1024**3:g} GiB but "
            f"nats.conf's max_file_store is {max_file_store / 1024**3:g} GiB: raise it or lower the budget"
        )


# --- (d) metrics ports: fixed, unique, scraped ------------------------------------------------------------


def scrape_targets() -> dict[str, dict[str, str]]:
    """Every static target of deploy/prometheus/prometheus.yml → its target labels."""
    targets = {}
    for job in load_yaml("deploy/prometheus/prometheus.yml")["scrape_configs"]:
        for group in job.get("static_configs") or []:
            for target in group["targets"]:
                targets[target] = {"job": job["job_name"], **(group.get("labels") or {})}
    return targets


def test_metrics_ports_are_fixed_unique_and_scraped_by_prometheus() -> None:
    targets = scrape_targets()
    owners: dict[str, str] = {}
    for name, (service, settings_class) in cuneiform_services().items():
        prefix = settings_class.model_config.get("env_prefix")
        port = own_env(service, settings_class, "metrics_port")
        assert port and port.isdigit() and int(port) > 0, (
            f"compose service {name} must set {prefix}METRICS_PORT (see the table in compose.yaml)"
        )
        assert own_env(service, settings_class, "metrics_host") == "0.0.0.0", (
            f"compose service {name} must set {prefix}METRICS_HOST=0.0.0.0 or Prometheus cannot reach it"
        )
        assert port not in owners, f"compose services {owners[port]} and {name} share metrics port {port}"
        owners[port] = name
        assert f"{name}:{port}" in targets, f"deploy/prometheus/prometheus.yml does not scrape {name}:{port}"
        assert targets[f"{name}:{port}"].get("service", name) == name, (
            f"target {name}:{port} carries another service label"
        )
    services = compose_services()
    for target in targets:
        host = target.rsplit(":", 1)[0]
        assert host == "localhost" or host in services, (
            f"prometheus.yml scrapes {target}, which compose.yaml does not define"
        )


# --- (e) mounted files exist; (f) Grafana and Prometheus find each other ---------------------------------


def test_every_mounted_file_exists() -> None:
    for name, service in compose_services().items():
        for source, target in bind_mounts(service):
            assert (ROOT / source).exists(), (
                f"compose service {name} mounts ./{source} at {target}, which does not exist"
            )


def test_prometheus_loads_the_mounted_alert_rules() -> None:
    rule_files = load_yaml("deploy/prometheus/prometheus.yml").get("rule_files") or []
    assert container_path_of("prometheus", "deploy/prometheus/alerts.yml") in rule_files


def grafana_datasources() -> list[dict[str, Any]]:
    datasources: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "grafana/provisioning/datasources").glob("*.y*ml")):
        datasources += yaml.safe_load(path.read_text()).get("datasources") or []
    return datasources


def test_grafana_datasource_points_at_the_prometheus_service() -> None:
    [prometheus] = [d for d in grafana_datasources() if d["type"] == "prometheus"]
    url = urlsplit(prometheus["url"])
    assert url.hostname == "prometheus", (
        f"the Grafana datasource URL {prometheus['url']} must name the prometheus service"
    )
    assert url.port in container_ports(compose_services()["prometheus"]), (
        f"the Grafana datasource URL {prometheus['url']} uses a port the prometheus service does not serve"
    )


def test_grafana_loads_the_mounted_dashboards() -> None:
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cuneiform.yml").read_text())["providers"]
    dashboards_dir = container_path_of("grafana", "deploy/grafana/dashboards")
    assert any(p["options"]["path"].rstrip("/") == dashboards_dir.rstrip("/") for p in providers), (
        f"no dashboard provider reads {dashboards_dir}, where compose mounts deploy/grafana/dashboards"
    )


# --- (g) alerts and dashboards use only metrics that exist -----------------------------------------------


def exported_metric_names() -> set[str]:
    """Sample names the services can expose: Counters add _total, Histograms _bucket/_sum/_count."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names = {"up"}  # Prometheus's own, per target
    for entry in entry_points(group=ENTRY_POINT_GROUP):  # each service's own metrics live in its main module
        importlib.import_module(entry.value.split(":")[0].rsplit(".", 1)[0] + ".main")
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, groupings and functions left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set(re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr))
    return {name for name in names if name.lower() not in PROMQL_WORDS | {"inf", "nan"}}


def test_promql_metric_names_finds_metrics_only() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (service, le) (rate(cuneiform_handler_seconds_bucket{service=~"$service"}'
        "[$__rate_interval]))) > 5 and on (service) up == 1 unless sum(x_total) without (consumer)"
    )
    assert promql_metric_names(expr) == {"cuneiform_handler_seconds_bucket", "up", "x_total"}


def alert_expressions() -> dict[str, str]:
    groups = load_yaml("deploy/prometheus/alerts.yml")["groups"]
    return {rule.get("alert") or rule["record"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/cuneiform.json").read_text())
    found = {}
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels += panel.get("panels") or []
        for target in panel.get("targets") or []:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if query and (match := re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)):
            found[f"variable {variable['name']}"] = match.group(1)
    return found


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    known = exported_metric_names()
    expressions = {f"alerts.yml {k}": v for k, v in alert_expressions().items()}
    expressions |= {f"cuneiform.json {k}": v for k, v in dashboard_expressions().items()}
    assert len(expressions) > 10, "found suspiciously few expressions: has the file layout changed?"
    unknown = {
        where: sorted(promql_metric_names(expr) - known)
        for where, expr in expressions.items()
        if promql_metric_names(expr) - known
    }
    cuneiform = sorted(n for n in known if n.startswith("cuneiform_"))
    assert not unknown, f"unknown metrics {unknown}; the services export: {', '.join(cuneiform)}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uids = {str(d.get("uid")) for d in grafana_datasources()}
    text = (DEPLOY / "grafana/dashboards/cuneiform.json").read_text()
    used = set(re.findall(r'"datasource":\s*\{[^{}]*"uid":\s*"([^"]+)"', text))
    assert used, "the dashboard names no datasource uid"
    assert used <= uids, f"the dashboard uses datasource uids {sorted(used - uids)}; provisioned: {sorted(uids)}"


# --- (h) the image runs the console scripts ---------------------------------------------------------------


def test_dockerfile_puts_the_synced_venv_on_path_and_drops_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    venv_match = re.search(r"UV_PROJECT_ENVIRONMENT=(\S+)", text)
    assert venv_match, "deploy/Dockerfile must set UV_PROJECT_ENVIRONMENT (where uv sync puts the venv)"
    venv = venv_match.group(1).rstrip("/")
    sync = re.search(r"uv sync ([^\n]*)", text)
    assert sync, "deploy/Dockerfile must run uv sync"
    for flag in ("--frozen", "--no-dev", "--all-packages"):
        assert flag in sync.group(1), f"deploy/Dockerfile: uv sync needs {flag}"
    runtime = text[text.rindex("\nFROM ") :]  # the last stage is what runs
    assert f"COPY --from=build {venv} {venv}" in runtime, f"the runtime stage must copy {venv} to the same path"
    assert re.search(rf'PATH="?{re.escape(venv)}/bin:', runtime), f"the runtime stage must put {venv}/bin first on PATH"
    users = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the runtime stage must end as a non-root USER"


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for entry in (".venv", ".tools", ".cuneiform", ".git"):
        assert entry in ignored, f".dockerignore must exclude {entry}"
