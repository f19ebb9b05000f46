"""Drive the real coding-agent CLIs non-interactively against a server, two turns each, through a
CapturingProxy, with the settings the README gives. Each client runs with its HOME and config dir
in a private folder, so a developer's own ~/.claude, ~/.codex or ~/.aider is never read or
written. Shared by tests/clients and benchmarks/scripts/agent_clients.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.clients.install import AIDER, CLAUDE_CODE, CODEX, ClientSpec
from tests.clients.proxy import CapturingProxy, Exchange

MODEL = "gemma3:270m"  # the embedded default's served name
CONTEXT = 32768  # its context, as `localserve up` prints it and /v1/models says
# seconds per client run; a cold Claude Code prefill (~23k tokens) takes about a minute on 2 cores
TURN_TIMEOUT = float(os.environ.get("LOCALSERVE_CLIENTS_TURN_TIMEOUT", 900))
# `localserve up` flags for the client runs: answers without a max_tokens of their own (Codex sends
# none) stop at 32 tokens instead of 4,096. The embedded Gemma 3 270M is a base model that seldom
# ends its turn by itself; it would fill the cap with text on a CPU for minutes.
SERVER_ARGS = ["--max-tokens-default", "32"]

# prompts that keep a 270M model's answers short
PROMPTS = ("Reply with the single word: hello", "Now reply with the single word: bye")

# variables of the developer's shell that would steer a client elsewhere
_SCRUB = re.compile(r"^(ANTHROPIC_|CLAUDE_|OPENAI_|CODEX_|AIDER_|LITELLM_|AZURE_|XDG_)")


def prefix_cache_counters(server_url: str) -> tuple[int, int]:
    """(hit tokens, query tokens) from the server's /metrics, read straight from the server."""
    text = httpx.get(server_url + "/metrics", timeout=10).text
    values = {}
    for name in ("hit", "query"):
        m = re.search(rf"^localserve_prefix_cache_{name}_tokens(?:_total)?\s+([0-9.e+]+)$", text, re.M)
        assert m, f"/metrics has no localserve_prefix_cache_{name}_tokens counter"
        values[name] = int(float(m.group(1)))
    return values["hit"], values["query"]


@dataclass
class Turn:
    index: int
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    exchanges: list[Exchange]
    cache_hit_tokens: int  # /metrics deltas around the turn
    cache_query_tokens: int

    @property
    def model_requests(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == "POST" and e.path.endswith(
            ("/v1/messages", "/v1/responses", "/v1/chat/completions"))]

    @property
    def failed_requests(self) -> list[Exchange]:
        """Error statuses (but Claude Code's probe of /api/hello) and answers cut off."""
        return [e for e in self.exchanges
                if (e.status >= 400 and e.path != "/api/hello") or (e.status < 400 and not e.answered)]

    @property
    def main_request(self) -> Exchange | None:
        """The turn's first model request that was answered in full (before it: refused ones the
        client sent again, and ones it gave up waiting for)."""
        return next((e for e in self.model_requests if e.status == 200 and e.answered), None)

    @property
    def ttft(self) -> float | None:
        """What the user waits: from the turn's first model request to the first generated
        content of any of them (retries included)."""
        requests = self.model_requests
        firsts = [e.first_content for e in requests if e.first_content is not None and e.status == 200]
        return min(firsts) - requests[0].started if firsts else None

    @property
    def cached_share(self) -> float:
        return self.cache_hit_tokens / self.cache_query_tokens if self.cache_query_tokens else 0.0

    def report(self) -> str:
        """What a failure message needs: the command, its output and every failed exchange."""
        failed = "\n".join(e.summary() for e in self.failed_requests) or "  (none)"
        return (f"turn {self.index}: {' '.join(self.argv)} -> exit {self.returncode} in {self.wall_s:.1f} s\n"
                f"stdout (tail): {self.stdout[-3000:]}\nstderr (tail): {self.stderr[-3000:]}\n"
                f"requests: {[(e.method, e.path, e.status) for e in self.exchanges]}\n"
                f"failed requests:\n{failed}")


@dataclass
class Session:
    """Two turns of one client against one server."""
    client: str
    turns: list[Turn] = field(default_factory=list)
    capture: Path | None = None  # every exchange as JSON lines
    server_log: Path | None = None

    def report(self) -> str:
        lines = self.server_log.read_text(errors="replace").splitlines() if self.server_log else []
        log = "\n".join(line for line in lines if "GET /health" not in line)[-3000:]
        return (f"{self.client} (capture: {self.capture})\n" + "\n".join(t.report() for t in self.turns)
                + f"\nserver log (tail):\n{log}")


class Client:
    spec: ClientSpec

    def __init__(self, exe: Path, home: Path, workdir: Path, proxy_url: str):
        self.exe, self.home, self.workdir, self.proxy_url = exe, home, workdir, proxy_url
        for d in (home, workdir):
            d.mkdir(parents=True, exist_ok=True)
        self.configure()

    def configure(self) -> None:
        pass

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
        home = str(self.home)
        return {**base, "HOME": home, "XDG_CONFIG_HOME": f"{home}/.config", "XDG_CACHE_HOME": f"{home}/.cache",
                "XDG_DATA_HOME": f"{home}/.local/share", "XDG_STATE_HOME": f"{home}/.local/state",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "TERM": "dumb", "NO_COLOR": "1", **self.client_env()}

    def client_env(self) -> dict[str, str]:
        return {}

    def argv(self, index: int, prompt: str, previous: Turn | None) -> list[str]:
        raise NotImplementedError

    def run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        proc = subprocess.Popen(argv, cwd=self.workdir, env=self.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n[killed after {timeout:.0f} s]"
            return -9, out, err
        except BaseException:  # interrupted: the client and its children must not outlive us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        return proc.returncode, out, err


CLAUDE_MAX_OUTPUT_TOKENS = 32


class ClaudeCode(Client):
    """`claude -p PROMPT --output-format json`; the second turn resumes the first's session."""
    spec = CLAUDE_CODE

    def client_env(self) -> dict[str, str]:
        return {"ANTHROPIC_BASE_URL": self.proxy_url, "ANTHROPIC_AUTH_TOKEN": "unused",
                "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
                "CLAUDE_CONFIG_DIR": str(self.home / ".claude"),
                # max_tokens is 32,000 otherwise: a 270M model rambling on for minutes
                "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(CLAUDE_MAX_OUTPUT_TOKENS),
                # the SDK's own limit on one request, 600 s, can be less than a cold ~23k-token
                # prefill on a busy 2-core machine; Claude Code then drops it and sends it again
                "API_TIMEOUT_MS": str(int(TURN_TIMEOUT * 1000)),
                "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}

    def argv(self, index: int, prompt: str, previous: Turn | None) -> list[str]:
        argv = [str(self.exe), "-p", prompt, "--output-format", "json"]
        if previous is not None:
            session = claude_result(previous).get("session_id")
            argv += ["--resume", session] if session else ["--continue"]
        return argv


def claude_result(turn: Turn) -> dict:
    """Claude Code's `--output-format json` result object ({} when stdout has none)."""
    for line in reversed(turn.stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get("type") == "result":
            return value
    return {}


class Codex(Client):
    """`codex exec --json PROMPT`, then `codex exec resume --last --json PROMPT`, with a provider
    in $CODEX_HOME/config.toml (wire_api = "responses")."""
    spec = CODEX

    @property
    def codex_home(self) -> Path:
        return self.home / ".codex"

    def configure(self) -> None:
        self.codex_home.mkdir(parents=True, exist_ok=True)
        (self.codex_home / "config.toml").write_text(codex_config(self.proxy_url + "/v1"))

    def client_env(self) -> dict[str, str]:
        return {"CODEX_HOME": str(self.codex_home)}

    def argv(self, index: int, prompt: str, previous: Turn | None) -> list[str]:
        head = [str(self.exe), "exec"] + (["resume", "--last"] if previous is not None else [])
        return head + ["--skip-git-repo-check", "--json", prompt]


def codex_config(base_url: str, extra: str = "") -> str:
    """The README's provider, plus no update check and no analytics (a test stays offline)."""
    return (f'model = "{MODEL}"\nmodel_provider = "localserve"\nmodel_context_window = {CONTEXT}\n'
            f'model_auto_compact_token_limit = {CONTEXT * 7 // 8}\ncheck_for_update_on_startup = false\n{extra}\n'
            f'[analytics]\nenabled = false\n\n'
            f'[model_providers.localserve]\nname = "localserve"\nbase_url = "{base_url}"\nwire_api = "responses"\n')


def codex_events(turn: Turn) -> list[dict]:
    out = []
    for line in turn.stdout.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


class Aider(Client):
    """`aider --model openai/gemma3:270m --message PROMPT ...`; the second turn is a second
    invocation in the same folder that restores the first's chat history."""
    spec = AIDER

    @property
    def metadata_file(self) -> Path:
        return self.home / "model-metadata.json"

    @property
    def settings_file(self) -> Path:
        return self.home / "model-settings.yml"

    def configure(self) -> None:
        # the context window from us, so aider never fetches litellm's model list from GitHub
        self.metadata_file.write_text(json.dumps({f"openai/{MODEL}": {
            "max_input_tokens": CONTEXT, "max_output_tokens": 4096, "max_tokens": 4096,
            "input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
            "litellm_provider": "openai", "mode": "chat"}}))
        # a cap on the answer: the 270M model copies aider's edit-format example at length
        self.settings_file.write_text(f"- name: openai/{MODEL}\n  edit_format: whole\n"
                                      f"  extra_params:\n    max_tokens: 48\n")

    def client_env(self) -> dict[str, str]:
        # litellm would fetch its model cost map from GitHub at import without the first one
        return {"OPENAI_API_BASE": self.proxy_url + "/v1", "OPENAI_API_KEY": "unused",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    def argv(self, index: int, prompt: str, previous: Turn | None) -> list[str]:
        argv = [str(self.exe), "--model", f"openai/{MODEL}", "--message", prompt, *AIDER_FLAGS,
                "--model-metadata-file", str(self.metadata_file), "--model-settings-file", str(self.settings_file),
                "--chat-history-file", str(self.workdir / ".aider.chat.history.md"),
                "--input-history-file", str(self.workdir / ".aider.input.history")]
        return argv + (["--restore-chat-history"] if previous is not None else [])


# non-interactive and offline-safe: no prompts, no git, no update check, no analytics, no
# release notes, no repo map, no URL scraping, no lint, no shell suggestions, plain output
AIDER_FLAGS = ("--yes-always", "--no-git", "--no-check-update", "--no-show-model-warnings", "--analytics-disable",
               "--no-show-release-notes", "--no-pretty", "--no-fancy-input", "--map-tokens", "0",
               "--no-detect-urls", "--no-auto-lint", "--no-suggest-shell-commands")

# what aider prints when the API call failed (litellm's exception names, its retry notice)
AIDER_ERROR = re.compile(r"litellm\.\w+Error|BadRequestError|APIConnectionError|APIError|InternalServerError|"
                         r"NotFoundError|AuthenticationError|Retrying in [0-9.]+ seconds|Traceback")

CLIENTS: dict[str, type[Client]] = {"claude-code": ClaudeCode, "codex": Codex, "aider": Aider}


def drive(client: Client, proxy: CapturingProxy, server_url: str, prompts=PROMPTS,
          timeout: float = TURN_TIMEOUT, server_log: Path | None = None) -> Session:
    """Run the client once per prompt (the later runs continue the first's session) and record
    each run's exchanges and the server's prefix-cache counters around it."""
    session = Session(client.spec.name, capture=proxy.log, server_log=server_log)
    previous = None
    for index, prompt in enumerate(prompts, start=1):
        argv = client.argv(index, prompt, previous)
        hit0, query0 = prefix_cache_counters(server_url)
        mark, t0 = proxy.mark(), time.monotonic()
        code, out, err = client.run(argv, timeout)
        wall = time.monotonic() - t0
        proxy.wait_idle()
        hit1, query1 = prefix_cache_counters(server_url)
        previous = Turn(index, argv, code, out, err, wall, proxy.since(mark), hit1 - hit0, query1 - query0)
        session.turns.append(previous)
    return session


def figures(session: Session) -> dict:
    """One row of the benchmark table: requests per turn, prompt tokens per turn (the server's
    prefix-cache query tokens, every request of the turn), turn 2's cached share, and each turn's
    time to first content as measured at the proxy."""
    first, second = session.turns[0], session.turns[-1]
    ttft = [first.ttft, second.ttft]
    return {"client": f"{session.client} {CLIENTS[session.client].spec.version}",
            "requests": [len(t.exchanges) for t in session.turns],
            "prompt_tokens": [t.cache_query_tokens for t in session.turns],
            "cached_share_turn2": second.cached_share, "ttft_cold_s": ttft[0], "ttft_warm_s": ttft[1],
            "api_errors": [e.summary() for t in session.turns for e in api_errors(t)]}


def api_errors(turn: Turn) -> list[Exchange]:
    """Error answers, but Claude Code's probe of /api/hello and a beta refused in Anthropic's
    words (the client sends the request again without it, as it does with Anthropic's API)."""
    return [e for e in turn.exchanges
            if e.status >= 400 and e.path != "/api/hello" and "anthropic-beta" not in (e.text or "")]


def markdown_table(rows: list[dict]) -> str:
    def s(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f} s"

    lines = ["| client | requests (turn 1 + 2) | prompt tokens turn 1 / turn 2 | turn 2 cached | "
             "TTFT cold (turn 1) | TTFT warm (turn 2) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['client']}{' (API errors)' if r['api_errors'] else ''} | {' + '.join(map(str, r['requests']))} | "
                     f"{' / '.join(f'{n:,}' for n in r['prompt_tokens'])} | {r['cached_share_turn2']:.0%} | "
                     f"{s(r['ttft_cold_s'])} | {s(r['ttft_warm_s'])} |")
    return "\n".join(lines)
