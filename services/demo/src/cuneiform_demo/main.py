"""``cuneiform-demo`` (``make demo``): the flywheel, end to end, on this machine.

1. start (or reuse) the embedded stack — nats-server, PostgreSQL, an S3 endpoint — on free ports;
2. start the services (recorder, archiver, readiness, trainer-dispatcher, trainer), each as its own
   process, as they are deployed;
3. run a simulated fleet of trading agents that record every decision through the SDK;
4. wait until the recorder has stored every event and proved each trajectory complete;
5. read the results back from PostgreSQL;
6. the loop: the archiver holds every event in its S3 segments; readiness fires and freezes a batch; the
   archiver exports it (OpenPipe ART + OpenAI chat JSONL + manifest); the reference trainer trains the
   policy with GRPO on its CPU backend; the dispatcher verifies and registers the model; the trained
   policy is checked on held-out markets;
7. the rollout: the deployer puts the new version in an A/B test against v1; the fleet keeps playing,
   each agent under the version routing assigns it; the deployer promotes it (or rolls it back) on the
   fleet's live rewards;
8. a deliberately worse version goes out as a canary and is rolled back — then the reward by version,
   and where to look.

The agents' "LLM" is a tabular softmax policy, a stand-in for a real model (see ``policy``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shlex
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from cuneiform_core.logging import configure_logging
from cuneiform_core.storage import ObjectStore
from cuneiform_sdk import Recorder, Routing, RoutingTable
from cuneiform_stack import LocalStack, StackEndpoints, StackError
from cuneiform_stack.cli import DEFAULT_DATA_DIR

from .console import Console, DemoError, shown
from .environment import ACTIONS, TRENDS
from .fleet import Chooser, FleetPlan, FleetResult, run_fleet
from .policy import STAND_IN_NOTE, TabularPolicy, held_out_reward
from .recorder_process import ServiceProcess, current_env, recorder_env
from .report import (
    SCHEMA,
    LoopOutcome,
    Summary,
    finalized_counts,
    loop_outcome,
    read_summary,
    reward_by_version,
    stream_last_seq,
)
from .rollout import MODEL_NAME, PolicyBook, ask, register

SECTIONS = 8
NEXT_ISSUES = "the LLM judge (RULER-style scores beside the environment's reward) and the admin page"
#: Trajectories per arm before the deployer tests (its production default is 30).
DEMO_MIN_TRAJECTORIES = 20


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    # The demo speaks through its console; library log lines (an export finished, …) only when they warn.
    configure_logging("demo", "WARNING", False)
    # SIGTERM (a supervisor, `kill`) stops the demo as Ctrl-C does: the recorder is stopped gracefully.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return Demo(args, console).run()
    except DemoError as error:
        console.say()
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        console.say()
        print("interrupted; the stack keeps running (`make stack-down` stops it)", file=sys.stderr)
        return 130


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.seed: int = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
        self.run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.policy = TabularPolicy()
        self.plan = FleetPlan(
            agents=args.agents,
            episodes=args.episodes,
            seed=self.seed,
            run_id=self.run_id,
            group_size=args.group_size,
            steps=args.steps,
            step_delay=args.step_delay,
        )
        self.stack = LocalStack(args.data_dir, progress=lambda message: console.item(f"· {message}"))
        self.recorder: ServiceProcess | None = None
        #: archiver, readiness, trainer-dispatcher, trainer (started after the recorder, stopped before it).
        self.loop: dict[str, ServiceProcess] = {}
        self.outcome: LoopOutcome | None = None
        self.kept_pid: int | None = None
        #: What the deployer decided in sections 7 and 8 (history entries), for the summary and the checks.
        self.decisions: list[dict[str, Any]] = []
        self.rounds = 0
        self.delivered_events = 0
        self.fleet_seconds = 0.0

    def run(self) -> int:
        c = self.console
        c.say(
            "Cuneiform demo, the whole loop: agents record every decision; readiness decides there is enough "
            "good data; the archiver exports it; a trainer trains the policy with GRPO; the model is registered, "
            "A/B-tested against the current one on the fleet's live rewards, and promoted or rolled back"
        )
        c.item(f"Note: {STAND_IN_NOTE}.")
        began = time.monotonic()
        endpoints = self.start_stack()
        try:
            recorder = self.start_recorder(endpoints)
            summary = asyncio.run(self.drive(endpoints, recorder))
        finally:
            self.finish_loop()
            stopped = self.finish_recorder()
        problems = self.check(summary)
        if not problems:
            c.say()
            model = self.outcome.model if self.outcome else None
            trained = f"; trained and registered {model['model_version']}" if model else ""
            verbs = {"promote": "promoted", "rollback": "rolled back"}
            decided = "".join(f"; {verbs[d['action']]} {d['version']}" for d in self.decisions)
            c.say(
                f"Done in {time.monotonic() - began:.0f} s: {self.plan.trajectories} trajectories recorded by "
                f"{self.plan.agents} agents, every event stored once, every trajectory proved complete{trained}"
                f"{decided}."
            )
        self.print_where_to_look(endpoints, recorder, stopped)
        if problems:
            raise DemoError("the run did not come out as expected:\n  - " + "\n  - ".join(problems))
        return 0

    # --- 1. the stack ----------------------------------------------------------------------------------

    def start_stack(self) -> StackEndpoints:
        self.console.section(1, SECTIONS, f"Embedded stack in {shown(self.stack.data_dir)}")
        try:
            endpoints = self.stack.start()
            status = self.stack.status()
        except StackError as error:
            raise DemoError(
                f"{error}\nServer logs are in {shown(self.stack.log_dir)}; "
                f"`{self.stack_command('down')}` then `make demo` starts afresh."
            ) from None
        for server in status.servers:
            state = "healthy" if server.healthy else "NOT HEALTHY"
            detail = f"  ({server.detail})" if server.detail else ""
            self.console.item(f"{server.name:<9} {state:<8} {server.url}{detail}")
        if not status.healthy:
            raise DemoError(f"not every server is healthy; see the logs in {shown(self.stack.log_dir)}")
        return endpoints

    # --- 2. the recorder -------------------------------------------------------------------------------

    def start_recorder(self, endpoints: StackEndpoints) -> ServiceProcess:
        self.console.section(
            2, SECTIONS, "Services: recorder, archiver, readiness, trainer-dispatcher, trainer, deployer"
        )
        env = recorder_env(current_env(), endpoints.as_env(), self.stack.env_file)
        log_path = self.stack.log_dir / "recorder.log"
        self.recorder = ServiceProcess(env, log_path)
        self.console.item(f"starting cuneiform-recorder; its log: {shown(log_path)}")
        self.recorder.start()
        took = self.recorder.wait_ready(self.args.ready_timeout)
        self.console.item(f"ready in {took:.1f} s (pid {self.recorder.pid}, metrics {self.recorder.metrics_url})")
        for service, settings in self.loop_settings().items():
            log_path = self.stack.log_dir / f"{service}.log"
            process = ServiceProcess({**settings, **env}, log_path, service=service)
            self.console.item(f"starting cuneiform-{service}; its log: {shown(log_path)}")
            process.start()
            self.loop[service] = process
            took = process.wait_ready(self.args.ready_timeout)
            self.console.item(f"ready in {took:.1f} s (pid {process.pid}, metrics {process.metrics_url})")
        return self.recorder

    def loop_settings(self) -> dict[str, dict[str, str]]:
        """The rest of the loop, tuned to a small, short run (the defaults suit a fleet running all day)."""
        plan = self.plan
        return {
            # Segments every 2 s rather than every minute.
            "archiver": {"CUNEIFORM_ARCHIVER_SEGMENT_MAX_AGE_S": "2"},
            # Ready once this run's worth of data is in; evaluated a second after trajectories complete.
            "readiness": {
                "CUNEIFORM_READINESS_MIN_TRAJECTORIES": str(plan.trajectories),
                "CUNEIFORM_READINESS_MIN_GROUPS": str(max(1, plan.groups * plan.episodes // 2)),
                "CUNEIFORM_READINESS_COOLDOWN_S": "0",
                "CUNEIFORM_READINESS_EVENT_DEBOUNCE_S": "1",
            },
            "trainer-dispatcher": {"CUNEIFORM_TRAINER_DISPATCHER_HEARTBEAT_TIMEOUT_S": "60"},
            "trainer": {"CUNEIFORM_TRAINER_HEARTBEAT_INTERVAL_S": "2"},
            # A trained version goes straight into a 50/50 A/B test; decided on 20 episodes per arm.
            "deployer": {
                "CUNEIFORM_DEPLOYER_AUTO_ROLLOUT": "ab",
                "CUNEIFORM_DEPLOYER_MIN_TRAJECTORIES": str(DEMO_MIN_TRAJECTORIES),
                "CUNEIFORM_DEPLOYER_EVALUATE_INTERVAL_S": "1",
                "CUNEIFORM_DEPLOYER_EVENT_DEBOUNCE_S": "0.5",
                "CUNEIFORM_DEPLOYER_MAX_DURATION_S": str(int(self.args.wait_timeout)),
            },
        }

    def finish_loop(self) -> None:
        """The loop's services stop with the demo (SIGTERM: each finishes what it holds first)."""
        for process in reversed(list(self.loop.values())):
            if process.alive:
                process.stop()
        self.loop = {}

    def finish_recorder(self) -> bool:
        """Stop the recorder gracefully (SIGTERM) unless --keep-running; whether it was stopped."""
        recorder, self.recorder = self.recorder, None
        if recorder is None or not recorder.alive:
            return True
        if self.args.keep_running:
            self.kept_pid = recorder.close_without_stopping()
            return False
        code = recorder.stop()
        if code not in (0, None):
            print(
                f"warning: the recorder exited with status {code} on SIGTERM; see {shown(recorder.log.path)}",
                file=sys.stderr,
            )
        return True

    # --- 3. to 5. the fleet, completion, the summary ------------------------------------------------------

    async def drive(self, endpoints: StackEndpoints, recorder: ServiceProcess) -> Summary:
        conn = await self.connect(endpoints.pg_dsn)
        try:
            run_started: datetime = await conn.fetchval("SELECT now()")
            result = await self.run_agents(endpoints)
            await self.wait_finalized(conn, result.trajectory_ids, recorder)
            summary = await read_summary(conn, result.trajectory_ids, run_started)
        finally:
            await conn.close()
        self.print_summary(summary)
        self.outcome = await self.close_the_loop(endpoints, run_started)
        # One training per demo run: readiness stops here, so the rollout's episodes start no second one.
        self.loop.pop("readiness").stop()
        self.console.item("readiness stopped: the rollout's episodes below are not meant to start a second training")
        assert self.outcome.model is not None
        await self.roll_out(endpoints, self.outcome.model["model_version"])
        await self.print_rewards_by_version(endpoints)
        return summary

    async def close_the_loop(self, endpoints: StackEndpoints, run_started: datetime) -> LoopOutcome:
        """Readiness fires, the archiver exports, the trainer trains, the model is registered."""
        c = self.console
        c.section(6, SECTIONS, "The loop: readiness → dataset → training → registered model")
        archiver = self.loop["archiver"]
        stream_last = await stream_last_seq(endpoints.nats_url)
        deadline = time.monotonic() + self.args.wait_timeout
        while (archived := archiver.metric("cuneiform_archiver_last_archived_seq")) < stream_last:
            self.check_alive(deadline, f"the archive holds {archived:.0f} of {stream_last} events")
            c.progress(f"  segments hold {archived:,.0f} of {stream_last:,} stream events")
            await asyncio.sleep(0.25)
        c.item(f"cold copy: every stream event ({stream_last:,}) is in a zstd JSONL segment in S3")
        conn = await self.connect(endpoints.pg_dsn)
        try:
            while (outcome := await loop_outcome(conn, run_started)).model is None:
                self.check_alive(deadline, f"the loop got as far as: {outcome.stage}")
                c.progress(f"  {outcome.stage}")
                await asyncio.sleep(0.25)
        finally:
            await conn.close()
        assert outcome.model is not None and outcome.batch is not None
        b, d, m = outcome.batch, outcome.dataset, outcome.model
        c.item(f"readiness: batch {b['batch_id']} of {b['trajectory_count']} trajectories in {b['group_count']} groups")
        c.item(f"    why: {b['reason']}")
        if d is not None:
            c.item(f"archiver: dataset {d['dataset_id']}: s3://cuneiform/{d['prefix']}")
            for f in d["files"]:
                size = f"{f['size'] / 1024:>8.1f} KiB"
                c.item(f"    {f['name']:<18} {f['records']:>5} lines  {size}  sha256 {f['sha256'][:16]}…")
        metrics = m["metrics"]
        c.item(
            f"trainer ({m['trainer_id']}, CPU GRPO backend, from {m['base_model']}): "
            f"{metrics.get('decisions', 0):.0f} decisions in "
            f"{metrics.get('groups_used', 0):.0f} groups, loss {metrics.get('loss', 0):+.3f}"
        )
        digest = m["artifact_sha256"][:16]
        c.item(f"registry: {m['model_name']} {m['model_version']} (sha256 {digest}…, attempt {m['attempt']})")
        store = self.object_store(endpoints)
        trained = TabularPolicy.loads((await store.get_bytes(m["artifact_key"])).decode())
        outcome.before = held_out_reward(self.policy, episodes=400)
        outcome.after = held_out_reward(trained, episodes=400)
        c.item(
            f"held-out check, 400 markets the policy never saw: mean reward {outcome.before:+.2f} "
            f"({self.policy.version}) → {outcome.after:+.2f} ({m['model_version']})"
        )
        return outcome

    # --- 7. and 8. rollouts decided on live reward ----------------------------------------------------------

    async def roll_out(self, endpoints: StackEndpoints, version: str) -> None:
        c = self.console
        c.section(7, SECTIONS, f"Rollout: {version} against {self.policy.version}, decided on the fleet's live reward")
        table = await self.wait_routing(
            endpoints, lambda t: t.strategy == "ab" and version in {a.version for a in t.arms}, f"{version} in an A/B"
        )
        [model] = (await ask(endpoints.nats_url, "deployer", "models", {"model_name": MODEL_NAME, "version": version}))[
            "models"
        ]
        c.item(
            f"deployer: registered {version} from pipeline.model.trained (batch {model['batch_id']}, dataset "
            f"{model['dataset_id']}, {model['trajectory_count']} trajectories, triggered by "
            f"{model['triggered_by']}, artifact sha256 {model['artifact_sha256'][:16]}…)"
        )
        c.item(f"deployer: A/B test {_weights(table)} (deployment {table.deployment_id}); agents keep their arm")
        await self.describe_rule(endpoints)
        first = await self.rounds_until_decided(endpoints, table.deployment_id, "rollout")
        champion = first["version"] if first["action"] == "promote" else self.policy.version
        c.section(8, SECTIONS, "A deliberately worse version: out as a canary, rolled back on live reward")
        store = self.object_store(endpoints)
        registered = await ask(
            endpoints.nats_url, "deployer", "models", {"model_name": MODEL_NAME, "version": champion}
        )
        base = TabularPolicy.loads((await store.get_bytes(registered["models"][0]["artifact_key"])).decode())
        worse = TabularPolicy(
            logits={t: {a: -v for a, v in row.items()} for t, row in base.logits.items()},
            name=MODEL_NAME,
            version=f"{champion}-inverted",
            temperature=base.temperature,
        )
        worse_reward, base_reward = held_out_reward(worse, episodes=400), held_out_reward(base, episodes=400)
        c.item(
            f"{worse.version}: {champion}'s preferences turned upside down (it sells into rising markets); "
            f"held-out mean reward {worse_reward:+.2f} vs {base_reward:+.2f}"
        )
        await register(endpoints.nats_url, store, worse, worse.version, "a deliberately worse policy (demo)")
        c.item(f"registered by hand: s3://cuneiform/models/{MODEL_NAME}/manual/{worse.version}/artifact")
        deployed = await ask(
            endpoints.nats_url,
            "deployer",
            "deploy",
            {
                "model_name": MODEL_NAME,
                "version": worse.version,
                "strategy": "canary",
                "percent": 50,
                "who": "demo",
                "why": "show a rollback: a canary that earns less than the champion",
            },
        )
        c.item(
            f"deployed as a canary to 50 % of the agents (production default: 10 %), deployment "
            f"{deployed['deployment_id']}"
        )
        await self.rounds_until_decided(endpoints, deployed["deployment_id"], "canary")

    async def describe_rule(self, endpoints: StackEndpoints) -> None:
        """The rule as the running deployer states it (its settings, not a copy of them)."""
        rule = (await ask(endpoints.nats_url, "deployer", "status", {"model_name": MODEL_NAME}))["rule"]
        self.console.item(
            f"the rule: once each arm has {rule['min_trajectories']} completed episodes, Welch's t-test on mean "
            f"reward (one-sided, alpha {rule['alpha']:g}): better → promote, worse → roll back; failure rate over "
            f"{rule['max_failure_rate']:.0%} → roll back"
        )

    async def wait_routing(self, endpoints: StackEndpoints, predicate: Any, what: str) -> RoutingTable:
        deadline = time.monotonic() + self.args.wait_timeout
        async with Routing(endpoints.nats_url, prefix="") as routing:
            while True:
                table = routing.table(MODEL_NAME)
                if table is not None and predicate(table):
                    return table
                self.check_alive(deadline, f"waiting for the deployer: {what}")
                self.console.progress(f"  waiting for the deployer: {what}")
                with contextlib.suppress(TimeoutError):
                    await routing.wait_for(lambda _: True, timeout=0.25)

    async def rounds_until_decided(self, endpoints: StackEndpoints, deployment_id: str, phase: str) -> dict[str, Any]:
        """Rounds of one episode per agent until the deployer ends the experiment; its decision."""
        c = self.console
        deadline = time.monotonic() + self.args.wait_timeout
        conn = await self.connect(endpoints.pg_dsn)
        try:
            for number in range(1, 51):
                self.rounds += 1
                plan = replace(self.plan, episodes=1, seed=self.seed * 1000 + self.rounds, phase=phase)
                result = await self.play(endpoints, plan, f"  round {number}: ")
                while not await self.all_finalized(conn, result.trajectory_ids):
                    self.check_alive(deadline, f"round {number}: waiting for the recorder")
                    await asyncio.sleep(0.1)
                # The deployer evaluates after completions (debounced): give it a moment to act.
                for _ in range(40):
                    state = await ask(endpoints.nats_url, "deployer", "deployment", {"deployment_id": deployment_id})
                    verdicts = state.get("verdicts") or []
                    if state["status"] != "active" or all(v["action"] == "continue" for v in verdicts):
                        break
                    await asyncio.sleep(0.25)
                if state["status"] != "active":
                    c.item(f"round {number}: {_round_line(result)}")
                    return await self.decided(endpoints, state)
                reason = verdicts[0]["reason"] if verdicts else "no verdict yet"
                c.item(f"round {number}: {_round_line(result)} · deployer: {reason}")
                self.check_alive(deadline, f"the experiment {deployment_id} is still undecided")
        finally:
            await conn.close()
        raise DemoError(f"the deployer did not decide experiment {deployment_id} within 50 rounds")

    async def decided(self, endpoints: StackEndpoints, state: dict[str, Any]) -> dict[str, str]:
        """Show how an experiment ended and the routing that follows; remember it for the summary."""
        decision = state["decision"] or {}
        [challenger] = state["challengers"] or ["?"]
        verb = {"promoted": "promoted", "rolled_back": "rolled back"}.get(state["status"], state["status"])
        self.console.item(f"deployer ({decision.get('actor', '?')}): {challenger} {verb}: {decision.get('reason', '')}")
        ended = state["deployment_id"]
        routed = await self.wait_routing(endpoints, lambda t: t.deployment_id != ended, "the new routing")
        self.console.item(f"routing now: {_weights(routed)} — each agent follows at its next episode")
        done = {"action": "promote" if state["status"] == "promoted" else "rollback", "version": challenger}
        self.decisions.append(done)
        return done

    @staticmethod
    async def all_finalized(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> bool:
        counts = await finalized_counts(conn, ids)
        return sum(counts.values()) == len(ids) and not counts.get("recording")

    async def print_rewards_by_version(self, endpoints: StackEndpoints) -> None:
        c = self.console
        conn = await self.connect(endpoints.pg_dsn)
        try:
            rows = await reward_by_version(conn, self.run_id)
        finally:
            await conn.close()
        c.say()
        c.say("Reward by version in this run (from the recorder: each trajectory carries the version it ran)")
        c.item(f"    {'version':<22}{'phase':<10}{'episodes':>9}{'mean':>9}{'std':>8}")
        for r in rows:
            c.item(f"    {r['version']:<22}{r['phase']:<10}{r['episodes']:>9}{r['mean']:>+9.2f}{r['std']:>8.2f}")

    def check_alive(self, deadline: float, where: str) -> None:
        for name, process in self.loop.items():
            if not process.alive:
                raise DemoError(
                    f"cuneiform-{name} exited ({where}); last lines of {shown(process.log.path)}:\n{process.log_tail()}"
                )
        if time.monotonic() > deadline:
            logs = ", ".join(shown(p.log.path) for p in self.loop.values())
            raise DemoError(f"the loop did not finish within {self.args.wait_timeout:.0f} s ({where}); see {logs}")

    async def connect(self, dsn: str) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(dsn, timeout=10)
        except (OSError, asyncpg.PostgresError) as error:
            raise DemoError(f"cannot connect to PostgreSQL at {dsn}: {error}") from None

    async def run_agents(self, endpoints: StackEndpoints) -> FleetResult:
        plan, c = self.plan, self.console
        c.section(3, SECTIONS, f"Agent fleet: {plan.agents} agents x {plan.episodes} episodes of {plan.steps} steps")
        groups = f"{plan.groups} scenario group{'s' if plan.groups > 1 else ''}"
        c.item(f"{groups} per round: the agents of a group trade the same market (a GRPO group)")
        c.item(f"seed {self.seed} (repeat this run's markets and choices with --seed {self.seed})")
        c.item(f"policy {self.policy.name} {self.policy.version}: " + self.describe_policy())
        # Every run starts from the untrained policy: registered by hand (idempotent) and deployed to all.
        store = self.object_store(endpoints)
        await register(endpoints.nats_url, store, self.policy, self.policy.version, "the untrained policy")
        deployed = await ask(
            endpoints.nats_url,
            "deployer",
            "deploy",
            {
                "model_name": MODEL_NAME,
                "version": self.policy.version,
                "strategy": "immediate",
                "who": "demo",
                "why": f"run {self.run_id} starts from the untrained policy",
            },
        )
        c.item(
            f"deployer: {MODEL_NAME} {self.policy.version} routed to every agent (deployment "
            f"{deployed['deployment_id']}, routing revision {deployed['revision']}); each agent asks the SDK's "
            "routing client which version to run before every episode"
        )
        c.item(f"run id {self.run_id} (in each trajectory's metadata)")
        result = await self.play(endpoints, plan)
        c.item(
            f"{result.ended} trajectories recorded, {self.delivered_events:,} events acknowledged by the stream "
            f"in {self.fleet_seconds:.1f} s"
        )
        return result

    def object_store(self, endpoints: StackEndpoints) -> ObjectStore:
        return ObjectStore(
            endpoints.s3_endpoint,
            endpoints.s3_access_key,
            endpoints.s3_secret_key,
            "cuneiform",
            region=endpoints.s3_region,
        )

    async def play(self, endpoints: StackEndpoints, plan: FleetPlan, label: str = "") -> FleetResult:
        """Run ``plan`` with every agent under its routed version; show progress; deliver every event."""
        c = self.console
        result = FleetResult()
        outbox = self.stack.data_dir / "demo-outbox"
        sdk = Recorder(endpoints.nats_url, prefix="", outbox_dir=outbox)
        routing = Routing(endpoints.nats_url, prefix="")
        began = time.monotonic()
        await sdk.start()
        await routing.start()
        choose: Chooser = PolicyBook(routing, self.object_store(endpoints), self.policy).choose
        fleet = asyncio.create_task(run_fleet(sdk, choose, plan, result))
        try:
            while not fleet.done():
                c.progress(label + self.fleet_line(result, sdk, began, plan))
                await asyncio.wait([fleet], timeout=0.1)
            fleet.result()
            delivered = await self.deliver(sdk, result, began, plan)
        finally:
            # Interrupted: the agents end their open trajectories as aborted before the SDK closes;
            # what it cannot deliver in time waits in its outbox for the next run.
            fleet.cancel()
            await asyncio.gather(fleet, return_exceptions=True)
            await routing.close()
            await sdk.close()
        if not delivered:
            raise DemoError(
                f"{sdk.stats.submitted - sdk.stats.acked} events were not acknowledged by NATS within "
                f"{self.args.wait_timeout:.0f} s; they wait in {shown(outbox)} and go out on the next run. "
                f"Is nats-server healthy? (`{self.stack_command('status')}`)"
            )
        self.delivered_events = sdk.stats.acked
        self.fleet_seconds = time.monotonic() - began
        return result

    async def deliver(self, sdk: Recorder, result: FleetResult, began: float, plan: FleetPlan) -> bool:
        deadline = time.monotonic() + self.args.wait_timeout
        while time.monotonic() < deadline:
            if await sdk.flush(0.1):
                return True
            self.console.progress(self.fleet_line(result, sdk, began, plan))
        return False

    def fleet_line(self, result: FleetResult, sdk: Recorder, began: float, plan: FleetPlan) -> str:
        replayed = f" ({sdk.stats.replayed:,} of them left by an earlier run)" if sdk.stats.replayed else ""
        return (
            f"{result.ended}/{plan.trajectories} trajectories recorded · {result.running_agents} agents playing · "
            f"{sdk.stats.submitted:,} events · {sdk.stats.acked:,} acked by the stream{replayed} · "
            f"{time.monotonic() - began:.1f} s"
        )

    def describe_policy(self) -> str:
        parts = []
        for trend in TRENDS:
            p = self.policy.probabilities(trend)
            parts.append(f"{trend}: " + "/".join(f"{a} {p[a]:.0%}" for a in ACTIONS))
        return "; ".join(parts)

    async def wait_finalized(self, conn: asyncpg.Connection, ids: list[uuid.UUID], recorder: ServiceProcess) -> None:
        c, total = self.console, len(ids)
        c.section(4, SECTIONS, "Recorder: storing every event and proving each trajectory complete")
        began = time.monotonic()
        counts: dict[str, int] = {}
        while True:
            counts = await finalized_counts(conn, ids)
            finalized = sum(n for status, n in counts.items() if status != "recording")
            seen = sum(counts.values())
            c.progress(
                f"{finalized}/{total} trajectories finalized · {seen - finalized} still recording · "
                f"{total - seen} not seen yet · {time.monotonic() - began:.1f} s"
            )
            if finalized == total:
                break
            if not recorder.alive:
                raise DemoError(
                    f"the recorder stopped (status {recorder.process.returncode if recorder.process else '?'}) "
                    f"before finalizing the run; last lines of {shown(recorder.log.path)}:\n{recorder.log_tail()}"
                )
            if time.monotonic() - began > self.args.wait_timeout:
                raise DemoError(
                    f"after {self.args.wait_timeout:.0f} s only {finalized} of {total} trajectories are finalized "
                    f"({seen - finalized} still recording, {total - seen} not seen). The recorder's log "
                    f"({shown(recorder.log.path)}) ends with:\n{recorder.log_tail()}"
                )
            await asyncio.sleep(0.2)
        by_status = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        c.item(f"all {total} finalized in {time.monotonic() - began:.1f} s after the fleet finished: {by_status}")

    # --- output ----------------------------------------------------------------------------------------

    def print_summary(self, s: Summary) -> None:
        c = self.console
        c.section(5, SECTIONS, f"Summary of this run, read back from PostgreSQL (schema {SCHEMA})")
        statuses = "  ".join(f"{status} {n}" for status, n in sorted(s.statuses.items(), key=lambda kv: -kv[1]))
        c.item(f"Trajectories by status:  {statuses or 'none'}")
        c.item(f"Events stored by type:   {s.total_events:,} in all")
        for event_type, n in s.events.items():
            c.item(f"    {event_type:<19}{n:>7,}")
        c.item(
            f"LLM calls recorded:      {s.llm_calls:,} (OpenAI chat form with a `trade` tool call; "
            f"{s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion tokens, estimated)"
        )
        c.item(f"Dead letters:            {s.dead_letters_run} (0 expected; {s.dead_letters_total} in the table)")
        shown_rows = s.scenarios[: self.args.show_scenarios]
        c.item(f"Reward per scenario (GRPO group), {len(shown_rows)} of {len(s.scenarios)}:")
        c.item(f"    {'scenario':<18}{'agents':>7}{'mean':>9}{'min':>9}{'max':>9}")
        for row in shown_rows:
            c.item(f"    {row.scenario_id:<18}{row.trajectories:>7}{row.mean:>+9.2f}{row.low:>+9.2f}{row.high:>+9.2f}")
        count = sum(row.trajectories for row in s.scenarios)
        if count:
            mean = sum(row.mean * row.trajectories for row in s.scenarios) / count
            c.item(
                f"    mean reward {mean:+.2f} over {count} trajectories; {s.groups_with_spread} of "
                f"{len(s.scenarios)} groups have a reward spread (what GRPO learns from)"
            )
        if s.example is not None:
            e = s.example
            reward = f", reward {e.reward:+.2f}" if e.reward is not None else ""
            c.item(f"One recorded decision ({e.agent_id}, step {e.step}):")
            c.item(f'    user: "{e.prompt}"')
            c.item(f"    assistant: {e.tool_call}{reward}")
        c.item(f"The database holds {s.trajectories_in_database:,} trajectories in all (earlier runs included).")

    def print_where_to_look(self, endpoints: StackEndpoints, recorder: ServiceProcess, stopped: bool) -> None:
        c = self.console
        c.say()
        c.say("Where to look")
        dsn = f"{endpoints.pg_dsn}?options=-csearch_path%3D{SCHEMA}"
        c.item(f"{'PostgreSQL':<14}{_psql()} {shlex.quote(dsn)}")
        c.item(f"{'':<14}e.g. SELECT scenario_id, agent_id, total_reward FROM trajectories ORDER BY 3 DESC LIMIT 5;")
        if stopped:
            c.item(f"{'Recorder':<14}stopped (SIGTERM, graceful); --keep-running leaves it up with its metrics")
        else:
            c.item(f"{'Recorder':<14}{recorder.metrics_url} (still running; stop it with: kill {self.kept_pid})")
        c.item(f"{'':<14}log: {shown(recorder.log.path)}")
        c.item(f"{'Archive':<14}`.venv/bin/cuneiform-archiver segments` lists the raw segments in S3")
        if self.outcome is not None and self.outcome.dataset is not None:
            prefix = self.outcome.dataset["prefix"]
            c.item(f"{'Dataset':<14}{prefix} in bucket cuneiform (manifest.json lists files and sha256)")
        c.item(
            f"{'Ask':<14}`.venv/bin/cuneiform-ask readiness status` (also: archiver status, trainer-dispatcher status)"
        )
        c.item(f"{'':<14}`.venv/bin/cuneiform-archiver export --help`: datasets from any filter")
        c.item(
            f"{'Rollout':<14}`.venv/bin/cuneiform-deployer status {MODEL_NAME}` (routing, reward by version), "
            f"`… history {MODEL_NAME}` (every change and why), `… rollback {MODEL_NAME} --why …`"
        )
        c.item(
            f"{'':<14}the services stop with the demo: to ask one, start it from the repository root "
            "(e.g. `.venv/bin/cuneiform-deployer &`; it reads .cuneiform/stack.env)"
        )
        c.item(f"{'NATS monitor':<14}{endpoints.nats_monitor_url}/jsz?streams=true")
        c.item(
            f"{'Stack':<14}`{self.stack_hint('status')}` shows it; `{self.stack_hint('down')}` stops it "
            "(its data stays for the next run)"
        )
        c.say()
        c.say(f"Note: {STAND_IN_NOTE}.")
        c.say(f"Next (the next issues): {NEXT_ISSUES}.")

    def check(self, s: Summary) -> list[str]:
        problems = []
        completed = s.statuses.get("completed", 0)
        if completed != self.plan.trajectories:
            problems.append(f"{completed} of {self.plan.trajectories} trajectories completed ({s.statuses})")
        expected_events = self.plan.trajectories * self.plan.events_per_trajectory
        if s.total_events != expected_events:
            problems.append(f"{s.total_events} events stored, {expected_events} sent")
        if s.dead_letters_run:
            problems.append(
                f"{s.dead_letters_run} dead letters during this run: "
                f"SELECT reason FROM {SCHEMA}.dead_letters ORDER BY failed_at DESC"
            )
        return problems

    # --- helpers ---------------------------------------------------------------------------------------

    def stack_command(self, command: str) -> str:
        words = ["cuneiform-stack", command]
        if self.args.data_dir != DEFAULT_DATA_DIR:
            words += ["--data-dir", str(self.args.data_dir)]
        return shlex.join(words)

    def stack_hint(self, command: str) -> str:
        """The make target for the default stack, the CLI with its --data-dir otherwise."""
        if self.args.data_dir == DEFAULT_DATA_DIR:
            return f"make stack-{command}"
        return self.stack_command(command)


def _weights(table: RoutingTable) -> str:
    shares: dict[str, float] = {}
    for arm in table.arms:
        shares[arm.version] = shares.get(arm.version, 0.0) + arm.weight
    return " / ".join(f"{v} {w:.0%}" for v, w in shares.items())


def _round_line(result: FleetResult) -> str:
    parts = []
    for version, rewards in sorted(result.by_version.items()):
        parts.append(f"{version} {len(rewards)} episodes, mean {sum(rewards) / len(rewards):+.2f}")
    return " · ".join(parts)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM does what Ctrl-C does (inside asyncio.run: cancel the run, so cleanup happens in order)."""
    on_sigint = signal.getsignal(signal.SIGINT)
    if callable(on_sigint):
        on_sigint(signal.SIGINT, frame)
    else:  # SIGINT ignored (started in the background by a shell): stop all the same
        raise KeyboardInterrupt


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return "psql"
    try:
        from cuneiform_stack.postgres import postgres_bin_dir

        return shown(postgres_bin_dir() / "psql")
    except (ImportError, StackError):
        return "psql"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cuneiform-demo",
        description="Start the embedded stack and the recorder, run a simulated fleet of trading agents that "
        "record every decision through the SDK, and show what was stored. The agents' 'LLM' is a tabular "
        "softmax policy, a stand-in for a real model.",
    )
    parser.add_argument("--agents", type=_positive, default=24, help="agents playing at once (default: 24)")
    parser.add_argument("--episodes", type=_positive, default=5, help="episodes per agent (default: 5)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"the embedded stack's data directory, started or reused (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the recorder running afterwards (the stack always stays)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the markets and choices (default: random)")
    parser.add_argument("--group-size", type=_positive, default=4, help="agents per scenario group (default: 4)")
    parser.add_argument("--steps", type=_positive, default=8, help="steps per episode (default: 8)")
    parser.add_argument(
        "--step-delay", type=float, default=0.05, help="simulated thinking time per decision, seconds (default: 0.05)"
    )
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for the recorder to start")
    parser.add_argument(
        "--wait-timeout", type=float, default=120.0, help="seconds to wait for delivery and for the recorder to finish"
    )
    parser.add_argument("--show-scenarios", type=int, default=5, help="scenario rows in the summary (default: 5)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
