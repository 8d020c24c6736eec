"""What chatsvc costs between the model and the screen, measured side by side with the direct
upstream in ONE run: the same load generator reads the fake DashScope directly (the limit, ratio
1.0) and through chatsvc's POST /api/v1/chat/{id}/stream, alternating, scenario by scenario.

    python bench/relay.py            # all scenarios, a few minutes on 2 cores
    python bench/relay.py --quick    # smaller counts, for a smoke run

    python bench/relay.py --only dt  # some scenarios; --profile FILE records chatsvc with py-spy
    python bench/relay.py --only s   # the database stalls for 5 s mid-answer: the longest gap a reader sees
    python bench/relay.py --only tw  # what a tool round costs: (w) against (t), in the same sitting
    python bench/relay.py --only bt --limits  # (b) and (t) with every limit on, against the same without
    python bench/relay.py --only abcd --litellm /work/litellm-venv/bin/python  # also through LiteLLM's proxy
    python bench/relay.py --only abcdt --floor  # also through the floor: chatsvc's stack and nothing else
    python bench/relay.py --only bt --against ../base --rounds 8  # a change against its base, before -> now

Reports chunks/s, time to first chunk, added delay per chunk (paced answers carry the fake's send
time in each chunk: arrival minus send time, through chatsvc against directly), chatsvc's CPU time
per chunk and peak RSS, and the load generator's own CPU next to every figure. Loopback only; every
loop is bounded in count and time.

(w), the issue's t2: answers with two MCP tool rounds. Only when w is run, a streamable-HTTP MCP
server (tests/mcp_server.py, whose `echo` tool answers at once) is started and named `bench` in
chatsvc's CHATSVC_MCP_SERVERS (the other scenarios then send `"server_tools": false`, so their
requests to the model are as without it). The fake answers a request that offers `bench__echo` with
a call to it while the request holds fewer than 2 `tool` messages, then with (t)'s 5 chunks: 1
client, 100 answers (10 with --quick), each answer's text and its 2 `ok` tool results checked. It
reports, against (t) run in the same sitting (t is run with w): chatsvc's CPU per tool round,
(cpu(w)/answer - cpu(t)/answer) / 2, and the wall time chatsvc adds per tool round, (wall(w)/answer
- wall(t)/answer - 2 x the fake's direct tool round trip - 2 x a direct MCP call) / 2, where the
round trip is the mean of direct requests to the fake shaped as a tool round and the MCP call the
mean of `echo` calls made with the mcp SDK's client from this process.

--replicas N, with --database (PostgreSQL): N chatsvc processes on the one database, replicas of one
service; answer i is read through replica i % N (its own answer: each replica's CPU and peak RSS are
summed on the chatsvc row, and every replica also follows the others' answers on the bus). Against
the same run without it, it says what a second process on the same machine buys:

    python bench/relay.py --only bcd --database postgresql://postgres@127.0.0.1/bench1
    python bench/relay.py --only bcd --database postgresql://postgres@127.0.0.1/bench2 --replicas 2

--limits (issue 24): a second chatsvc runs beside the first, the same in every setting but with every
per-owner limit set (CHATSVC_LIMIT_*, high enough never to refuse: LIMITS below), and each scenario is
read through it too, right after the first (target `limits`). Both have the same CHATSVC_PRICES (the
cost limit needs one), so what differs is the limits alone: each answer's admission is one conditional
UPDATE of its owner's row, and with a token or cost budget it also sends max_tokens. The bench sends no
CHATSVC_USER_HEADER: every answer has the one owner '', so all the clients' admissions and settlements
update the same row (the contended case). Each chatsvc has a database of its own: a second SQLite file,
or with --database the PostgreSQL database named by --limits-database (two processes on one PostgreSQL
database would be replicas, each mirroring the other's answers). A last line sets limits against no
limits: chatsvc's CPU per chunk and the time to first chunk (p50); with --rounds N each scenario is
read N times through each of them, alternately (each in turn first), and that line gives the medians and each round's
difference (the noise to judge a difference by).

--litellm PYTHON: LiteLLM's proxy as a peer, read in the same run. PYTHON is a python that has
litellm[proxy], in a venv of its own (never chatsvc's):

    python3 -m venv /work/litellm-venv && /work/litellm-venv/bin/pip install 'litellm[proxy]==1.108.7'
    PYTHONPATH=. CHATSVC_TITLES=first-line python bench/relay.py --only abcd --litellm /work/litellm-venv/bin/python

The bench starts `PYTHON -m litellm.proxy.proxy_cli` on a free port, one uvicorn worker, with a config
written to its temp workdir (LITELLM_CONFIG below: model `qwen-plus` is `openai/qwen-plus` at the fake's
/compatible-mode/v1), no database, no master key (LiteLLM refuses to start without one unless told
`dangerously_permit_weak_or_unset_master_key`), no callbacks, no model-info refresh (a GET of the
fake's /v1/models at start and every 300 s), telemetry off and the model cost map read from the
package (LITELLM_ENV: no fetch from GitHub at start), its log at WARNING into litellm.log in the
workdir. Once /health/liveliness answers, one answer is read through it (a check, and its lazy
imports done before any measure). Each scenario but (e) is then read through it right after chatsvc
(target `litellm`): the same OpenAI request as direct, on its /v1/chat/completions, every answer's
text checked as direct's. Its CPU is that of its process and all its children, its peak RSS their
sum. A last line per scenario sets chatsvc's CPU per chunk against LiteLLM's. LiteLLM writes no
database and keeps no replay log here: it does less per answer than chatsvc, which stores each one.

--floor: bench/floor.py as another target, read right after chatsvc in every scenario but (e): the
least a relay on chatsvc's own stack costs (uvicorn, Starlette, sse-starlette and httpx2, as chatsvc
runs them; no database, no middleware, nothing stored), answering on chatsvc's route with chatsvc's
events, so the same reader checks every answer's text. The (fit) line is then drawn for the floor too,
and a last line says what chatsvc adds above it: its fixed CPU per answer and its CPU per chunk, and
its added time to first chunk, each minus the floor's. That is the part of the cost that is chatsvc's
own to cut; the floor's is the libraries', which the design card fixes.

--against DIR: a change's before and after in one sitting. DIR is another checkout of chatsvc (the
change's base: `git worktree add ../base HEAD~1`, or `git archive BASE | tar -x -C ../base`); its
chatsvc.py runs beside this checkout's (target `before`: the same settings, its own port and
database, a second SQLite file or with --database the PostgreSQL database --against-database names)
and each scenario is read through both, each in turn first, --rounds times. A last block gives per
scenario the medians, before -> now: CPU per answer and per chunk, time to first chunk p50 (paced:
added delay p99), the (fit) line's fixed CPU per answer drawn for each round, and each round's
difference. On a busy 2-core machine one round's CPU per answer differs by up to 20 % between two
processes, and the two places are not equal: the same code against itself gave (t) medians of +2.1 %,
+10.4 % (8 rounds), +2.7 %, +6.3 % and +10.5 % (5 rounds), "now" dearer each time. 350 us of CPU
added to every turn (a tenth of (t)'s answer) gave -8.8 %, -6.5 % (7 rounds) and -16.7 % (8 rounds),
and (t)'s time to first chunk, steadier (one client, wall time), -0.41, -0.38 and -0.66 ms, against
+0.06 to +0.37 ms for the same code. So: 8 rounds or more, (t)'s time to first chunk read beside the
CPU, and for a verdict the run made from both checkouts, each against the other: what the change
costs shows with opposite signs, what the places cost with the same.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from procs import free_port  # noqa: E402
from rawhttp import request  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu(stat: str) -> float:
    """utime + stime in seconds, from the text of a /proc/<pid>/stat."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    return stat_cpu(Path(f"/proc/{pid}/stat").read_text())


# --limits: every limit on, none ever reached by a bench (one owner, '', answers all the bench's turns)
LIMITS = {
    "CHATSVC_LIMIT_TOKENS_PER_DAY": "1000000000000",
    "CHATSVC_LIMIT_TOKENS_PER_MONTH": "1000000000000",
    "CHATSVC_LIMIT_COST_PER_MONTH": "1000000000",
    "CHATSVC_LIMIT_ANSWERS_PER_MINUTE": "100000000",
    "CHATSVC_LIMIT_CONCURRENT_ANSWERS": "100000",
}
# --limits: the prices both chatsvc processes get (the cost limit needs prices), per million tokens
PRICES = {"currency": "CNY", "models": {"qwen-plus": {"input": 0.8, "output": 2, "output_thinking": 8,
                                                      "cached_input": 0.2}}}  # fmt: skip


# --litellm: its proxy's environment, and its config (JSON is YAML) with the fake's base URL for {base}
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the cost map in the package, no fetch from GitHub at start
    "LITELLM_TELEMETRY_DISABLED": "true",
    "LITELLM_LOG": "WARNING",  # chatsvc's LOG_LEVEL here; uvicorn's access log too
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
    "JSON_LOGS": "False",
}
LITELLM_CONFIG = {
    "model_list": [{"model_name": "qwen-plus",
                    "litellm_params": {"model": "openai/qwen-plus", "api_base": "{base}", "api_key": "sk-bench"}}],
    "litellm_settings": {"drop_params": True, "callbacks": [], "success_callback": [], "failure_callback": []},
    # no master key; no GET <api_base>/v1/models at start and every 300 s (its model-info refresh)
    "general_settings": {"dangerously_permit_weak_or_unset_master_key": True, "disable_spend_logs": True,
                         "disable_model_info_refresh": True},
}  # fmt: skip


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, alive now."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def group_cpu_seconds(pids: list[int]) -> float:
    """The CPU time of these processes (one that has exited meanwhile counts nothing)."""
    total = 0.0
    for each in pids:
        try:
            total += cpu_seconds(each)
        except OSError:
            continue
    return total


def postgres_cpu_seconds() -> float:
    """The CPU time of every PostgreSQL server process on this machine (for --database)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            total += stat_cpu(text)
    return total


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_mb(pid: int, kind: str = "VmHWM") -> float:
    """Peak (VmHWM, since the last reset) or current (VmRSS) resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Result:
    chunks: int = 0
    ttfc: list[float] = field(default_factory=list)  # seconds from request to first chunk
    delay: list[float] = field(default_factory=list)  # paced answers, per chunk: arrival - the fake's send time
    errors: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # per answer: the longest wait between two chunks


STAMPED = re.compile(r"t(\d+)@(\d+) ")


async def read_answer(port: int, path: str, body: dict, chunks: int, pause: float, via_chatsvc: bool,
                      result: Result, tool_results: int = 0) -> None:  # fmt: skip
    """One answer, read to its end; every chunk's text is checked, and (w) its `ok` tool results
    counted. Paced answers are stamped: the fake writes each chunk's send time (CLOCK_MONOTONIC,
    shared by the processes) into its text."""
    started = time.perf_counter()
    response = await request("127.0.0.1", port, "POST", path, body)
    arrivals: list[float] = []
    delays: list[float] = []
    text: list[str] = []
    full_text = None
    results_ok = 0
    buffer = b""
    async for data in response.chunks():
        now, now_ns = time.perf_counter(), time.monotonic_ns()
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            line = event[event.find(b"data: ") + 6 :] if b"data: " in event else b""
            if not line or line == b"[DONE]":
                continue
            content = ""
            if via_chatsvc:
                if b'"type":"chunk"' in line:
                    content = json.loads(line)["data"]["content"]
                elif b'"type":"end"' in line:
                    full_text = json.loads(line)["data"]["full_text"]
                elif b'"type":"tool_result"' in line:
                    results_ok += json.loads(line)["data"]["outcome"] == "ok"
            else:
                obj = json.loads(line)
                content = "".join((c.get("delta") or {}).get("content") or "" for c in obj.get("choices") or ())
            if content:
                arrivals.append(now)
                text.append(content)
                if pause:
                    stamp = STAMPED.fullmatch(content)
                    delays.append((now_ns - int(stamp[2])) / 1e9 if stamp else float("nan"))
    if not via_chatsvc:
        full_text = "".join(text)
    if pause:
        ok = full_text == "".join(text) and all(
            (m := STAMPED.fullmatch(c)) and int(m[1]) == i for i, c in enumerate(text)
        )
    else:
        ok = full_text == "".join(f"t{i} " for i in range(chunks))
    if not ok or len(arrivals) != chunks or results_ok != tool_results:
        result.errors.append(f"{path}: {len(arrivals)} chunks, text ok: {ok}, ok tool results: {results_ok}")
        return
    result.chunks += chunks
    result.ttfc.append(arrivals[0] - started)
    result.gaps.append(max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0))
    result.delay += delays


async def listen_once(port: int, session_id: str) -> int:
    """A GET channel listener that reads one whole answer; returns the chunk events it saw."""
    response = await request("127.0.0.1", port, "GET", f"/api/v1/chat/{session_id}/stream")
    seen, buffer = 0, b""
    async for data in response.chunks():
        buffer += data
        seen += buffer.count(b'"type":"chunk"')
        if b'"type":"end"' in buffer or b'"type":"error"' in buffer:
            response.close()
            return seen
        buffer = buffer[buffer.rfind(b"\n\n") + 2 :] if b"\n\n" in buffer else buffer
    return seen


async def run_scenario(target: str, ports: dict, answers: int, clients: int, chunks: int, pause: float,
                       listeners: bool = False, tag: str = "",
                       tool_rounds: int = 0) -> tuple[Result, float]:  # fmt: skip
    result = Result()
    # with the MCP server of (w) configured, only (w) offers its tools: the rest ask as without it
    offer = {"server_tools": bool(tool_rounds)} if "mcp" in ports else {}
    queue = list(range(answers))
    via = target in ("chatsvc", "limits", "floor", "before")  # --limits, --floor (chatsvc's events), --against

    async def client_loop() -> None:
        while queue:
            i = queue.pop()
            message = f"bench {chunks} {pause}" + (" stamp" if pause else "")
            if via:
                sid = f"{tag}-{i}-{time.monotonic_ns()}"
                replicas = ports.get("replicas") if target == "chatsvc" else None  # --replicas: answer i on i % N
                port = replicas[i % len(replicas)] if replicas else ports[target]
                listener = asyncio.ensure_future(listen_once(port, sid)) if listeners else None
                if listener:
                    await asyncio.sleep(0)  # let it connect first
                await read_answer(port, f"/api/v1/chat/{sid}/stream", {"message": message, **offer}, chunks,
                                  pause, True, result, tool_rounds)  # fmt: skip
                if listener and await asyncio.wait_for(listener, 30) != chunks:
                    result.errors.append(f"listener of {sid} missed chunks")
            else:
                body = {"model": "qwen-plus", "stream": True, "messages": [{"role": "user", "content": message}]}
                if target == "litellm":  # --litellm: its proxy, asked as the fake is
                    await read_answer(ports["litellm"], "/v1/chat/completions", body, chunks, pause, False, result)
                    continue
                await read_answer(ports["fake"], "/compatible-mode/v1/chat/completions", body, chunks, pause, False,
                                  result)  # fmt: skip

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(clients))), timeout=300)
    return result, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args: argparse.Namespace) -> None:
    if args.replicas > 1 and not args.database:
        raise SystemExit("--replicas needs --database: one SQLite file serves one process.")
    workdir = Path(tempfile.mkdtemp(prefix="chatsvc-bench-"))
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_dashscope.py")], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    fake_port = int(fake.stdout.readline())
    port = free_port()
    env = {**os.environ, "DASHSCOPE_API_KEY": "sk-bench", "PORT": str(port), "HOST": "127.0.0.1",
           "DASHSCOPE_BASE_URL": f"http://127.0.0.1:{fake_port}/compatible-mode/v1", "LOG_LEVEL": "warning",
           "DATABASE_URL": args.database or f"sqlite+aiosqlite:///{workdir}/bench.db", "PYTHONPATH": str(ROOT),
           "CHATSVC_REPLAY_SECONDS": "2",
           # every answer here starts a conversation: the model's title would be a second upstream
           # request each; and a long stamped answer ((c), (d)) passes the summary's threshold of the
           # default budget, a third. This measures the relay: bench/summaries.py measures summaries.
           "CHATSVC_TITLES": "first-line", "CHATSVC_SUMMARIES": "off"}  # fmt: skip
    if args.database:  # PostgreSQL: an empty database of its own; (f) needs SQLite's prepared history
        args.only = args.only.replace("f", "")
    else:
        prepare_history(env["DATABASE_URL"], args.history, args.depth)
    ports = {"fake": fake_port, "chatsvc": port}
    limited_env = None
    if args.limits:  # the same chatsvc with every limit set, on a port and a database of its own
        if args.database and not args.limits_database:
            raise SystemExit("--limits with --database needs --limits-database: another empty PostgreSQL database.")
        env["CHATSVC_PRICES"] = json.dumps(PRICES)
        ports["limits"] = free_port()
        limited_env = {**env, **LIMITS, "PORT": str(ports["limits"]),
                       "DATABASE_URL": args.limits_database or f"sqlite+aiosqlite:///{workdir}/limits.db"}  # fmt: skip
    mcp = None
    if "w" in args.only:  # (w) is measured against (t), in the same sitting
        args.only += "" if "t" in args.only else "t"
        from mcp_server import McpProcess

        mcp = McpProcess.http(workdir)
        env["CHATSVC_MCP_SERVERS"] = json.dumps({"mcpServers": {"bench": mcp.entry()}})
        ports["mcp"] = mcp.url
    before_env = None
    if args.against and args.limits:
        raise SystemExit("--against and --limits pair chatsvc with another each: one at a time.")
    if args.against:  # the same settings (MCP's too), the code of another checkout, its own database and port
        if args.database and not args.against_database:
            raise SystemExit("--against with --database needs --against-database: another empty PostgreSQL database.")
        if not (Path(args.against) / "chatsvc.py").is_file():
            raise SystemExit(f"--against {args.against}: no chatsvc.py there (a checkout, e.g. git worktree add).")
        ports["before"] = free_port()
        before_env = {**env, "PORT": str(ports["before"]), "PYTHONPATH": str(Path(args.against).resolve()),
                      "DATABASE_URL": args.against_database or f"sqlite+aiosqlite:///{workdir}/before.db"}  # fmt: skip
        if not args.database:
            prepare_history(before_env["DATABASE_URL"], args.history, args.depth)
    server = subprocess.Popen([sys.executable, "-c", "import sys, chatsvc; sys.exit(chatsvc.main())"], env=env,
                              cwd=workdir)  # fmt: skip
    pids = {"chatsvc": server.pid}
    others = []  # --replicas: the other chatsvc processes, on the same PostgreSQL database
    for _ in range(args.replicas - 1):
        ports.setdefault("replicas", [port]).append(free_port())
        others.append(subprocess.Popen([sys.executable, "-c", "import sys, chatsvc; sys.exit(chatsvc.main())"],
                                       env={**env, "PORT": str(ports["replicas"][-1])}, cwd=workdir))  # fmt: skip
    before = None
    if before_env:
        before = subprocess.Popen([sys.executable, "-c", "import sys, chatsvc; sys.exit(chatsvc.main())"],
                                  env=before_env, cwd=workdir)  # fmt: skip
        pids["before"] = before.pid
    floor = None
    if args.floor:  # --floor: the card's stack alone, on a port of its own
        ports["floor"] = free_port()
        floor = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floor.py"), str(ports["floor"])], env=env,
                                 cwd=workdir)  # fmt: skip
        pids["floor"] = floor.pid
    litellm = start_litellm(args.litellm, fake_port, workdir, ports) if args.litellm else None
    if litellm:
        pids["litellm"] = litellm.pid
    limited = None
    if limited_env:
        limited = subprocess.Popen([sys.executable, "-c", "import sys, chatsvc; sys.exit(chatsvc.main())"],
                                   env=limited_env, cwd=workdir)  # fmt: skip
        pids["limits"] = limited.pid
    try:
        wait_ready(port)
        for other_port in ports.get("replicas", [])[1:]:
            wait_ready(other_port)
        if limited:
            wait_ready(ports["limits"])
        if before:
            wait_ready(ports["before"])
        if floor:
            wait_ready(ports["floor"])
        if litellm:
            wait_litellm(litellm, ports["litellm"], workdir)
        if mcp:
            wait_mcp_up(port)
            if limited:
                wait_mcp_up(ports["limits"])
            if before:
                wait_mcp_up(ports["before"])
        q = 10 if args.quick else 1
        scenarios = [  # key, title, answers, concurrent clients, chunks, pause, GET listener per answer
            ("a", "1 client, 20 answers x 1000 chunks, no pause", 20 // q or 1, 1, 1000, 0, False),
            ("b", "50 clients, 500 answers x 100 chunks, no pause", 500 // q, 50, 100, 0, False),
            ("c", "200 concurrent x 300 chunks, 20 ms apart", 200 // q, 200 // q, 300, 0.02, False),
            ("d", "20 concurrent x 300 chunks, 20 ms apart", 20, 20, 300, 0.02, False),
            ("e", "(b) plus a GET channel listener on every answer", 500 // q, 50, 100, 0, True),
            ("t", "time to first chunk at low load: 1 client, 500 answers x 5 chunks", 500 // q, 1, 5, 0, False),
        ]
        scenarios = [s for s in scenarios if s[0] in args.only]
        profiler = None
        if args.profile:  # py-spy's collapsed stacks of the chatsvc process, for flame graphs or grep
            profiler = subprocess.Popen(["py-spy", "record", "-p", str(server.pid), "-f", "raw", "-o", args.profile,
                                         "-r", "200", "--nonblocking"], stdout=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1)
        rows = []
        # --limits, --against: each round's figures, (chatsvc, limits) and (before, chatsvc)
        pairs: dict[str, list[tuple[dict, dict]]] = {}

        def processes(target: str) -> list[int]:
            """Whose CPU and peak RSS a target's row sums: every chatsvc replica (--replicas), LiteLLM's
            process tree (its CLI may run uvicorn as a child); direct's row: chatsvc's, idle."""
            if target == "chatsvc":
                return [server.pid, *(other.pid for other in others)]
            if target == "litellm":
                return process_tree(pids["litellm"])
            return [pids.get(target, server.pid)]

        def measure(target: str, key: str, params: dict) -> dict:
            for each in processes(target):
                reset_peak_rss(each)
            pg0 = postgres_cpu_seconds() if args.database and target != "litellm" else None
            cpu0, own0 = group_cpu_seconds(processes(target)), own_cpu()
            result, wall = asyncio.run(run_scenario(target, ports, tag=key, **params))
            group = processes(target)
            cpu = group_cpu_seconds(group) - cpu0
            return dict(result=result, wall=wall, cpu=cpu, own=own_cpu() - own0, rss=sum(map(rss_mb, group)),
                        pg=postgres_cpu_seconds() - pg0 if pg0 is not None else None)  # fmt: skip

        for key, title, answers, clients, chunks, pause, listeners in scenarios:
            params = dict(answers=answers, clients=clients, chunks=chunks, pause=pause, listeners=listeners)
            figures = {}
            targets = (
                ("chatsvc",)
                if listeners
                else ("direct", "chatsvc") + (("floor",) if floor else ()) + (("litellm",) if litellm else ())
            )
            second = ("limits",) if limited else ("before",) if before else ()
            paired = ("chatsvc", "limits") if limited else ("before", "chatsvc") if before else ()
            for target in targets + second:
                figures[target] = measure(target, key, params)
            rows.append((key, title, figures))
            report_row(key, title, figures)
            if paired:  # more rounds, alternately: the (limits) or (against) row's medians
                pairs[key] = [(figures[paired[0]], figures[paired[1]])]
                for n in range(1, args.rounds):  # each in turn first: what one leaves (a vacuum) falls on both
                    order = (second[0], "chatsvc") if n % 2 else ("chatsvc", second[0])
                    measured = {t: measure(t, f"{key}{n}", params) for t in order}
                    pairs[key].append((measured[paired[0]], measured[paired[1]]))
        fit_row(rows)
        if floor:
            fit_row(rows, "floor")
            floor_row(rows)
        if limited:
            limits_row(pairs)
        if before:
            against_row(pairs, args.against)
        if litellm:
            litellm_row(rows)
        if profiler:
            profiler.send_signal(2)
            profiler.wait(30)
        if "g" in args.only:
            leak_row(ports, server.pid, q)
        if "f" in args.only:
            history_row(ports, args)
        if "s" in args.only:
            stall_row(ports, env["DATABASE_URL"], q)
        if mcp:
            tools_row(ports, server.pid, mcp.proc.pid, next(f for k, _, f in rows if k == "t")["chatsvc"], q)
    finally:
        for process in (server, limited, before, floor, *others):
            if process:
                process.terminate()
                process.wait(30)
        if litellm:
            stop_tree(litellm)
        fake.terminate()
        fake.wait(10)
        if mcp:
            mcp.stop()


def report_row(key: str, title: str, figures: dict) -> None:
    print(f"\n({key}) {title}")
    direct = figures.get("direct")
    for target, f in figures.items():
        r: Result = f["result"]
        rate = r.chunks / f["wall"] if f["wall"] else 0
        line = (f"  {target:8} {rate:10,.0f} chunks/s"
                f"  ttfc p50 {pct(r.ttfc, .5) * 1000:7.2f} ms p99 {pct(r.ttfc, .99) * 1000:7.2f} ms"
                f"  loadgen cpu {f['own'] / max(r.chunks, 1) * 1e6:6.1f} us/chunk")  # fmt: skip
        if r.delay:
            line += f"  delay/chunk p50 {pct(r.delay, 0.5) * 1000:.2f} ms p99 {pct(r.delay, 0.99) * 1000:.2f} ms"
        if target != "direct":
            process = target if target in ("litellm", "floor", "before") else "chatsvc"
            line += (
                f"  {process} cpu {f['cpu'] / max(r.chunks, 1) * 1e6:6.1f} us/chunk"
                f" {f['cpu'] / max(len(r.ttfc), 1) * 1e6:6.0f} us/answer  peak rss {f['rss']:6.1f} MB"
            )
            if f["pg"] is not None:
                line += f"  postgres cpu {f['pg'] / max(r.chunks, 1) * 1e6:6.1f} us/chunk"
            if direct:
                d = direct["result"]
                line += f"  ratio {rate / (d.chunks / direct['wall']):.2f}"
                line += f"  added ttfc p50 {(pct(r.ttfc, 0.5) - pct(d.ttfc, 0.5)) * 1000:+.2f} ms"
                if r.delay:
                    line += (f"  added delay/chunk p50 {(pct(r.delay, .5) - pct(d.delay, .5)) * 1000:+.2f} ms"
                             f" p99 {(pct(r.delay, .99) - pct(d.delay, .99)) * 1000:+.2f} ms")  # fmt: skip
        if r.errors:
            line += f"  ERRORS {len(r.errors)}: {r.errors[:2]}"
        print(line, flush=True)


FIT_PAIRS = (("a", "t"), ("b", "t"), ("a", "b"))  # the first pair run: (a) and (t) are one client each


def fit(rows: list, target: str = "chatsvc") -> tuple[float, float, str] | None:
    """A target's CPU split into a fixed cost per answer and a cost per chunk: the line through two
    scenarios' CPU per answer against their chunks per answer (cpu/answer = fixed + chunks x per_chunk);
    (fixed, per chunk, how it was drawn), in seconds, or None without two of (a), (b), (t)."""
    per_answer = {}
    for key, _, figures in rows:
        f = figures.get(target)
        if f is not None and f["result"].ttfc and key in "abt":
            answers = len(f["result"].ttfc)
            per_answer[key] = (f["result"].chunks / answers, f["cpu"] / answers)
    pair = next((p for p in FIT_PAIRS if all(k in per_answer for k in p)), None)
    if pair is None:
        return None
    (n1, c1), (n2, c2) = per_answer[pair[0]], per_answer[pair[1]]
    per_chunk = (c1 - c2) / (n1 - n2)
    how = (f"the line through ({pair[0]}) and ({pair[1]}): {c1 * 1e6:.0f} us/answer at {n1:.0f} chunks,"
           f" {c2 * 1e6:.0f} us/answer at {n2:.0f}")  # fmt: skip
    return c2 - n2 * per_chunk, per_chunk, how


def fit_row(rows: list, target: str = "chatsvc") -> None:
    if line := fit(rows, target):
        fixed, per_chunk, how = line
        print(f"\n(fit) {target} cpu: {fixed * 1e6:7.0f} us per answer (fixed) + {per_chunk * 1e6:6.1f} us per chunk"
              f"  ({how})", flush=True)  # fmt: skip


def floor_row(rows: list) -> None:
    """--floor: what chatsvc adds above the floor (its stack alone): CPU per answer and per chunk (the
    fits' difference), and per scenario its CPU per chunk and its time to first chunk p50, each minus
    the floor's."""
    print("\n(floor) chatsvc above the floor, its stack alone (bench/floor.py):")
    ours, theirs = fit(rows), fit(rows, "floor")
    if ours and theirs:
        print(f"  (fit) chatsvc adds {(ours[0] - theirs[0]) * 1e6:.0f} us per answer (fixed) and"
              f" {(ours[1] - theirs[1]) * 1e6:.1f} us per chunk", flush=True)  # fmt: skip
    for key, _, figures in rows:
        if "floor" not in figures:
            continue
        cpu = [figures[t]["cpu"] / max(figures[t]["result"].chunks, 1) * 1e6 for t in ("chatsvc", "floor")]
        ttfc = [pct(figures[t]["result"].ttfc, 0.5) * 1000 for t in ("chatsvc", "floor")]
        print(f"  ({key}) cpu/chunk {cpu[0]:.1f} against {cpu[1]:.1f} us ({cpu[0] - cpu[1]:+.1f});"
              f" ttfc p50 {ttfc[0]:.2f} against {ttfc[1]:.2f} ms ({ttfc[0] - ttfc[1]:+.2f})", flush=True)  # fmt: skip


def cpu_per_chunk(f: dict) -> float:
    """A target's figures (measure): its CPU per chunk, in us."""
    return f["cpu"] / max(f["result"].chunks, 1) * 1e6


def cpu_per_answer(f: dict) -> float:
    return f["cpu"] / max(len(f["result"].ttfc), 1) * 1e6


def ttfc_p50(f: dict) -> float:
    """... its time to first chunk p50, in ms."""
    return pct(f["result"].ttfc, 0.5) * 1000


def limits_row(pairs: dict[str, list[tuple[dict, dict]]]) -> None:
    """--limits: each scenario's chatsvc with every limit set against the one without: the medians of
    the rounds (--rounds, read alternately), and each round's difference, to see the noise by."""
    print(f"\n(limits) every limit set against none, per scenario, median of {len(next(iter(pairs.values())))}"
          " round(s) (positive: the limits cost more):")  # fmt: skip
    for key, rounds in pairs.items():
        cpu = [[cpu_per_chunk(f) for f in pair] for pair in rounds]
        per_answer = [[cpu_per_answer(f) for f in pair] for pair in rounds]
        ttfc = [[ttfc_p50(f) for f in pair] for pair in rounds]
        plain_cpu, limited_cpu = (statistics.median(r[i] for r in cpu) for i in (0, 1))
        plain_ttfc, limited_ttfc = (statistics.median(r[i] for r in ttfc) for i in (0, 1))
        added_answer = statistics.median(r[1] for r in per_answer) - statistics.median(r[0] for r in per_answer)
        print(f"  ({key}) chatsvc cpu {plain_cpu:6.1f} -> {limited_cpu:6.1f} us/chunk"
              f" ({(limited_cpu / plain_cpu - 1) * 100:+.1f} %, {added_answer:+.0f} us/answer)"
              f"  ttfc p50 {plain_ttfc:7.2f} -> {limited_ttfc:7.2f} ms ({limited_ttfc - plain_ttfc:+.2f} ms)",
              flush=True)  # fmt: skip
        if len(rounds) > 1:
            print(f"      each round: cpu {', '.join(f'{(b / a - 1) * 100:+.1f} %' for a, b in cpu)};"
                  f" ttfc p50 {', '.join(f'{b - a:+.2f} ms' for a, b in ttfc)}", flush=True)  # fmt: skip


def against_row(pairs: dict[str, list[tuple[dict, dict]]], checkout: str) -> None:
    """--against: this checkout's chatsvc against the other's, per scenario, median of the rounds (read
    alternately, each in turn first): CPU per answer and per chunk, time to first chunk p50 and, paced,
    the added delay p99; then the fixed CPU per answer (the (fit) line, drawn for each round on both);
    and each round's difference, the noise to judge a difference by."""
    rounds = len(next(iter(pairs.values())))
    print(f"\n(against) before ({checkout}) -> now (this checkout), median of {rounds} round(s) read"
          " alternately (positive: now costs more):")  # fmt: skip

    def median_of(figure: Callable[[dict], float], key: str) -> tuple[float, float, list[float]]:
        each = [(figure(before), figure(now)) for before, now in pairs[key]]
        return statistics.median(b for b, _ in each), statistics.median(n for _, n in each), [n - b for b, n in each]

    def delay(f: dict) -> float:
        return pct(f["result"].delay, 0.99) * 1000

    for key in pairs:
        (b_answer, n_answer, d_answer), (b_chunk, n_chunk, _) = (
            median_of(cpu_per_answer, key),
            median_of(cpu_per_chunk, key),
        )
        b_ttfc, n_ttfc, d_ttfc = median_of(ttfc_p50, key)
        change = (n_answer / b_answer - 1) * 100
        line = (f"  ({key}) cpu {b_answer:7.0f} -> {n_answer:7.0f} us/answer ({change:+.1f} %),"
                f" {b_chunk:6.1f} -> {n_chunk:6.1f} us/chunk; ttfc p50 {b_ttfc:7.2f} -> {n_ttfc:7.2f} ms"
                f" ({n_ttfc - b_ttfc:+.2f})")  # fmt: skip
        if pairs[key][0][0]["result"].delay:
            b_delay, n_delay, _ = median_of(delay, key)
            line += f"; delay/chunk p99 {b_delay:.2f} -> {n_delay:.2f} ms"
        print(line, flush=True)
        if rounds > 1:
            print(f"      each round: cpu {', '.join(f'{d:+.0f}' for d in d_answer)} us/answer;"
                  f" ttfc p50 {', '.join(f'{d:+.2f}' for d in d_ttfc)} ms", flush=True)  # fmt: skip
    fits = []
    for n in range(rounds):
        rows = [(key, "", {"before": each[n][0], "chatsvc": each[n][1]}) for key, each in pairs.items()]
        line, old = fit(rows), fit(rows, "before")
        if line and old:
            fits.append((old[0] * 1e6, line[0] * 1e6, old[1] * 1e6, line[1] * 1e6))
    if fits:
        b_fixed, n_fixed = statistics.median(f[0] for f in fits), statistics.median(f[1] for f in fits)
        b_chunk, n_chunk = statistics.median(f[2] for f in fits), statistics.median(f[3] for f in fits)
        change = (n_fixed / b_fixed - 1) * 100
        print(f"  (fit) fixed cpu {b_fixed:.0f} -> {n_fixed:.0f} us per answer ({change:+.1f} %),"
              f" {b_chunk:.1f} -> {n_chunk:.1f} us per chunk; each round: fixed"
              f" {', '.join(f'{f[1] - f[0]:+.0f}' for f in fits)} us", flush=True)  # fmt: skip


def litellm_row(rows: list) -> None:
    """--litellm: chatsvc's CPU per chunk against LiteLLM's proxy's, per scenario both were read in."""
    print("\n(litellm) chatsvc against LiteLLM's proxy, CPU per chunk (its process tree):")
    for key, _, figures in rows:
        if "litellm" not in figures:
            continue
        ours, theirs = (figures[t]["cpu"] / max(figures[t]["result"].chunks, 1) * 1e6 for t in ("chatsvc", "litellm"))
        times = f"{theirs / ours:.1f}" if ours else "inf"
        print(f"  ({key}) chatsvc cpu/chunk is {times} times below LiteLLM's"
              f" ({ours:.1f} against {theirs:.1f} us/chunk)", flush=True)  # fmt: skip


def start_litellm(python: str, fake_port: int, workdir: Path, ports: dict) -> subprocess.Popen:
    """--litellm: LiteLLM's proxy on a free port (ports["litellm"]), one worker, its log in the workdir."""
    config = json.dumps(LITELLM_CONFIG).replace("{base}", f"http://127.0.0.1:{fake_port}/compatible-mode/v1")
    (workdir / "litellm.yaml").write_text(config)
    ports["litellm"] = free_port()
    log = open(workdir / "litellm.log", "ab")  # the child writes it until the end
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM_", "PYTHON"))} | LITELLM_ENV
    command = [python, "-m", "litellm.proxy.proxy_cli", "--config", str(workdir / "litellm.yaml"),
               "--host", "127.0.0.1", "--port", str(ports["litellm"]), "--num_workers", "1"]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)  # fmt: skip


def wait_litellm(proc: subprocess.Popen, port: int, workdir: Path) -> None:
    """Until LiteLLM's proxy is live, then one answer through it (5 chunks, checked as the bench does)."""
    deadline = time.monotonic() + 120

    async def live() -> int:
        response = await request("127.0.0.1", port, "GET", "/health/liveliness")
        await response.read()
        return response.status

    while True:
        if proc.poll() is not None:
            tail = (workdir / "litellm.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"LiteLLM's proxy exited ({proc.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"LiteLLM's proxy did not start: see {workdir / 'litellm.log'}")
        try:
            if asyncio.run(live()) == 200:
                break
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.2)
    result = Result()
    body = {"model": "qwen-plus", "stream": True, "messages": [{"role": "user", "content": "bench 5 0"}]}
    asyncio.run(read_answer(port, "/v1/chat/completions", body, 5, 0, False, result))
    if result.errors:
        raise RuntimeError(f"LiteLLM's proxy answered wrong: {result.errors}; see {workdir / 'litellm.log'}")


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL to what is left of its tree after 30 s."""
    tree = process_tree(proc.pid)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    for pid in tree[1:]:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def leak_row(ports: dict, pid: int, q: int) -> None:
    """(g): (b) five times more; chatsvc's RSS after each, once the replay logs are dropped
    (CHATSVC_REPLAY_SECONDS=2 here). A leak shows as growth from run to run."""
    sizes = []
    for run_no in range(5):
        result, _ = asyncio.run(run_scenario("chatsvc", ports, 500 // q, 50, 100, 0, tag=f"g{run_no}"))
        time.sleep(3)
        sizes.append(rss_mb(pid, "VmRSS"))
        if result.errors:
            print(f"  ERRORS {len(result.errors)}: {result.errors[:2]}")
    print(f"\n(g) RSS after each of 5 repeated (b) runs: {', '.join(f'{mb:.1f}' for mb in sizes)} MB")


HISTORIES = {  # (f): session id -> what its tree looks like
    "history-small": "a chain of 10 messages",
    "history-big": "{n:,} messages on {branches:,} branches",
    "history-deep": "a path {depth:,} messages deep",
}


def history_tree(sid: str, n: int, branches: int = 1, seed: int = 7) -> list[tuple[str, str | None, str]]:
    """(id, parent id, role) of `n` messages: `branches` branches of n / branches messages, each after
    a random answer of an earlier one (the first from the root). Ids grow along every path."""
    import random

    rng = random.Random(seed)
    rows: list[tuple[str, str | None, str]] = []
    answers: list[str] = []
    per_branch = max(2, n // branches) // 2 * 2
    while len(rows) < n:
        parent = rng.choice(answers) if answers else None
        for step in range(min(per_branch, n - len(rows))):
            mid = f"{sid}-{len(rows):09d}"
            role = ("user", "assistant")[step % 2]
            rows.append((mid, parent, role))
            if role == "assistant":
                answers.append(mid)
            parent = mid
    return rows


def prepare_history(database: str, messages: int, depth: int) -> None:
    """(f): conversations of `messages` stored messages on many branches, of a path `depth` deep, and
    of 10, written before chatsvc starts (the schema by chatsvc's own store, so it is current)."""
    import chatsvc

    async def schema() -> None:
        store = chatsvc.Store(database)
        await store.open()
        await store.close()

    asyncio.run(schema())
    trees = {"history-small": history_tree("history-small", 10),
             "history-big": history_tree("history-big", messages, branches=max(1, messages // 100)),
             "history-deep": history_tree("history-deep", depth)}  # fmt: skip
    with sqlite3.connect(database.split("///", 1)[1]) as conn:
        for sid, rows in trees.items():
            conn.execute("INSERT INTO conversations (session_id, current_message_id, created_at, updated_at)"
                         " VALUES (?, ?, 'x', 'x')", (sid, rows[-1][0]))  # fmt: skip
            conn.executemany(
                "INSERT INTO messages (id, parent_id, session_id, role, content, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'complete', 'x', 'x')",
                ((mid, parent, sid, role, f"message {mid}") for mid, parent, role in rows),
            )


def history_row(ports: dict, args: argparse.Namespace) -> None:
    async def timed(n: int, method: str, path: str, body: dict | None) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            response = await request("127.0.0.1", ports["chatsvc"], method, path, body)
            await response.read()
            assert response.status == 200, (path, response.status)
            times.append(time.perf_counter() - started)
        return times

    n = 10 if args.quick else 50
    conv = "/api/v1/context/conversations"
    results = {}
    for sid in HISTORIES:  # a chat (the context is built from the current leaf up), and a read of the branch
        results[sid] = {
            "chat": statistics.median(asyncio.run(timed(n, "POST", f"/api/v1/chat/{sid}", {"message": "bench 5 0"}))),
            "read": statistics.median(asyncio.run(timed(n, "GET", f"{conv}/{sid}?limit=50", None))),
        }
    small = results["history-small"]
    print(f"\n(f) median of {n}, against {HISTORIES['history-small']}:")
    for sid, title in HISTORIES.items():
        title = title.format(n=args.history, branches=args.history // 100, depth=args.depth)
        r = results[sid]
        print(f"  {title:<40} chat {r['chat'] * 1000:7.2f} ms (ratio {r['chat'] / small['chat']:.2f})"
              f"   GET branch {r['read'] * 1000:6.2f} ms (ratio {r['read'] / small['read']:.2f})")  # fmt: skip
    # a switch to the deep path's first message walks down all of it to its newest leaf
    root = "history-deep-000000000"
    switch = asyncio.run(timed(n, "PATCH", f"{conv}/history-deep", {"current_message_id": root}))
    print(f"  switch to the first message of the deep path (down {args.depth:,}): "
          f"{statistics.median(switch) * 1000:.2f} ms")  # fmt: skip


HOLD_LOCK = {  # another process holds the database's write lock for argv[2] seconds
    "sqlite": "import sqlite3, sys, time\ndb = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "db.execute('BEGIN IMMEDIATE')\ntime.sleep(float(sys.argv[2]))\ndb.execute('ROLLBACK')",
    "postgresql": "import asyncio, sys, asyncpg\nasync def main():\n    conn = await asyncpg.connect(sys.argv[1])\n"
                  "    async with conn.transaction():\n"
                  "        await conn.execute('LOCK TABLE messages IN EXCLUSIVE MODE')\n"
                  "        await asyncio.sleep(float(sys.argv[2]))\nasyncio.run(main())",
}  # fmt: skip


def stall_row(ports: dict, database: str, q: int) -> None:
    """(s): 10 answers x 200 chunks 20 ms apart (4 s each), twice: as they are, and with the database
    stalled for 5 s from 1 s in (another process holds its write lock). The longest gap between two
    chunks that a reader sees must not grow with the stall: the relay never waits for the database."""
    kind = "sqlite" if database.startswith("sqlite") else "postgresql"
    target = database.split("///", 1)[1] if kind == "sqlite" else database

    async def scenario(stall: bool) -> Result:
        async def hold() -> None:
            await asyncio.sleep(1)
            holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLD_LOCK[kind], target, "5")
            await holder.wait()

        holding = asyncio.ensure_future(hold()) if stall else None
        result, _ = await run_scenario("chatsvc", ports, 10, 10, 200, 0.02, tag=f"s{stall}")
        if holding:
            await holding
        return result

    direct, _ = asyncio.run(run_scenario("direct", ports, 10, 10, 200, 0.02))
    calm, stalled = asyncio.run(scenario(False)), asyncio.run(scenario(True))
    print("\n(s) the database stalls for 5 s mid-answer: 10 answers x 200 chunks, 20 ms apart; longest gap"
          f" between chunks: direct {max(direct.gaps) * 1000:.1f} ms, chatsvc {max(calm.gaps) * 1000:.1f} ms,"
          f" chatsvc with the stall {max(stalled.gaps) * 1000:.1f} ms")  # fmt: skip
    for result in (direct, calm, stalled):
        if result.errors:
            print(f"  ERRORS {len(result.errors)}: {result.errors[:2]}")


def tools_row(ports: dict, pid: int, mcp_pid: int, t: dict, q: int) -> None:
    """(w): 1 client, 100 answers of two MCP tool rounds and (t)'s 5 chunks; see the module's docstring."""
    answers = 100 // q
    cpu0, mcp0, own0 = cpu_seconds(pid), cpu_seconds(mcp_pid), own_cpu()
    result, wall = asyncio.run(run_scenario("chatsvc", ports, answers, 1, 5, 0, tag="w", tool_rounds=2))
    cpu, mcp_cpu, own = cpu_seconds(pid) - cpu0, cpu_seconds(mcp_pid) - mcp0, own_cpu() - own0
    round_trip, errors = asyncio.run(direct_tool_rounds(ports["fake"], answers))
    mcp_call = asyncio.run(direct_mcp_calls(ports["mcp"], answers))
    t_answers = t["result"].chunks // 5 or 1
    t_wall, t_cpu = t["wall"] / t_answers, t["cpu"] / t_answers
    w_wall, w_cpu = wall / max(answers, 1), cpu / max(answers, 1)
    print(f"\n(w) two MCP tool rounds per answer (bench__echo, then 5 chunks): 1 client, {answers} answers")
    print(f"  chatsvc  wall/answer {w_wall * 1000:7.2f} ms (t: {t_wall * 1000:6.2f} ms)"
          f"  chatsvc cpu/answer {w_cpu * 1e6:7.0f} us (t: {t_cpu * 1e6:6.0f} us)"
          f"  mcp server cpu/answer {mcp_cpu / max(answers, 1) * 1e6:6.0f} us"
          f"  loadgen cpu/answer {own / max(answers, 1) * 1e6:6.0f} us")  # fmt: skip
    print(f"  direct   the fake's tool round trip {round_trip * 1000:.2f} ms, an MCP echo call (SDK client)"
          f" {mcp_call * 1000:.2f} ms (means of {answers})")  # fmt: skip
    added = (w_wall - t_wall - 2 * round_trip - 2 * mcp_call) / 2
    print(f"  per tool round: chatsvc cpu {(w_cpu - t_cpu) / 2 * 1e6:6.0f} us,  added wall {added * 1000:+.2f} ms",
          flush=True)  # fmt: skip
    if result.errors or errors:
        print(f"  ERRORS {len(result.errors) + errors}: {result.errors[:2]}")


async def direct_tool_rounds(port: int, n: int) -> tuple[float, int]:
    """The mean time of a request to the fake shaped as (w)'s first round (it answers with the call),
    read to its end; and how many did not answer with a call to bench__echo."""
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    echo = {"type": "function", "function": {"name": "bench__echo", "description": "Answer.", "parameters": schema}}
    body = {"model": "qwen-plus", "stream": True, "messages": [{"role": "user", "content": "bench 5 0"}],
            "tools": [echo], "parallel_tool_calls": True}  # fmt: skip
    times, errors = [], 0
    for _ in range(n):
        started = time.perf_counter()
        response = await request("127.0.0.1", port, "POST", "/compatible-mode/v1/chat/completions", body)
        data = await response.read()
        times.append(time.perf_counter() - started)
        errors += b'"bench__echo"' not in data or b"[DONE]" not in data
    return statistics.mean(times), errors


async def direct_mcp_calls(url: str, n: int) -> float:
    """The mean time of an `echo` call made with the mcp SDK's client, on one connection (after one
    call to warm it)."""
    from mcp import Client

    async with Client(url) as client:
        await client.call_tool("echo", {"text": "bench"})
        times = []
        for _ in range(n):
            started = time.perf_counter()
            await client.call_tool("echo", {"text": "bench"})
            times.append(time.perf_counter() - started)
    return statistics.mean(times)


def wait_mcp_up(port: int) -> None:
    """Until chatsvc has connected to (w)'s MCP server and listed its tools (its metric says so)."""
    deadline = time.monotonic() + 30

    async def metrics() -> bytes:
        response = await request("127.0.0.1", port, "GET", "/metrics")
        return await response.read()

    while time.monotonic() < deadline:
        if b'chatsvc_mcp_server_up{server="bench"} 1.0' in asyncio.run(metrics()):
            return
        time.sleep(0.1)
    raise RuntimeError("chatsvc did not connect to the MCP server of (w)")


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:

            async def ping() -> int:
                response = await request("127.0.0.1", port, "GET", "/healthz")
                await response.read()
                return response.status

            if asyncio.run(ping()) == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("chatsvc did not start")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the answers, for a smoke run")
    parser.add_argument("--history", type=int, default=100_000, help="stored messages in the long conversation of (f)")
    parser.add_argument("--depth", type=int, default=1_000, help="the deep path's length in (f)")
    parser.add_argument("--only", default="abcdefgstw", help="the scenarios to run, e.g. --only bd")
    parser.add_argument("--database", metavar="URL", help="chatsvc's DATABASE_URL, e.g. an empty PostgreSQL database")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="with --database: this many chatsvc processes on it, answer i read through replica i %% N",
    )
    parser.add_argument("--limits", action="store_true", help="also through a chatsvc with every limit set (issue 24)")
    parser.add_argument("--limits-database", metavar="URL", help="--limits with --database: the limited chatsvc's")
    parser.add_argument("--rounds", type=int, default=1,
                        help="--limits, --against: rounds of each scenario through both")  # fmt: skip
    parser.add_argument(
        "--against",
        metavar="DIR",
        help="also through the chatsvc of another checkout (the change's base): before -> now",
    )
    parser.add_argument("--against-database", metavar="URL", help="--against with --database: the other's")
    parser.add_argument("--litellm", metavar="PYTHON", help="also through LiteLLM's proxy, run by this python")
    parser.add_argument("--floor", action="store_true",
                        help="also through bench/floor.py: chatsvc's stack (uvicorn, Starlette, sse-starlette,"
                        " httpx2) with nothing of chatsvc's own")  # fmt: skip
    parser.add_argument("--profile", metavar="FILE", help="record chatsvc with py-spy (collapsed stacks) into FILE")
    run(parser.parse_args())
