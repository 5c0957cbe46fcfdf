"""Routing policy: signals about one request -> a decision (which side answers) and the reasons why.

A policy is declarative (a TOML file, docs/hybrid.md has the reference) plus an optional Python hook
for custom rules. ``Policy.decide(signals)`` is plain comparisons on numbers that are already known
(no I/O, no tokenizing), so it costs microseconds; gathering the signals is ``edgec.runtime.hybrid``'s
job.

Decisions:
    local              the device answers; the cloud is never contacted
    cloud              the cloud answers; the device cannot (the prompt does not fit its context)
    local-then-cloud   the device starts; if its confidence drops the cloud continues the same answer
    cloud-then-local   the cloud answers; if it fails, times out or returns garbage, the device does

Rules, first match decides (every rule that fired is listed in the reasons):
    1. privacy      local-only request or message, or personal data with ``personal_data = "local"``
    2. no cloud     no endpoint configured
    3. capability   prompt + min answer does not fit the local context -> cloud;
                    the request needs a feature the local model lacks -> cloud-then-local
    4. cloud health circuit breaker open -> local
    5. cost         the cloud call's estimated cost would exceed the budget -> local
    6. device       battery low and not charging, too hot, too little free memory -> cloud-then-local
    7. deadline     estimated local time (measured prefill/decode rates) over the budget -> cloud-then-local
    8. default      ``[route] default``
Then the hook, if any, may replace the decision (and must give its own reason).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from edgec.errors import InputError
from edgec.runtime.device import DeviceState

ROUTES = ("local", "cloud", "local-then-cloud", "cloud-then-local")
PERSONAL_DATA_ACTIONS = ("local", "redact", "allow")


@dataclass(frozen=True)
class Reason:
    """Why: ``code`` is for programs (stable), ``text`` for people."""

    code: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "text": self.text}


@dataclass
class Decision:
    route: str
    reasons: list[Reason]
    redact: bool = False  #: redact personal data from what the cloud receives


@dataclass
class Signals:
    """What is known about one request before it runs."""

    prompt_tokens: int
    max_tokens: int
    local_context: int
    local_only: bool = False
    personal_data: tuple[str, ...] = ()  #: kinds found (``edgec.runtime.privacy``)
    features: frozenset[str] = frozenset()  #: what the request needs, e.g. "tools", "images"
    deadline_s: float | None = None  #: the request's latency budget
    local_estimate_s: float = 0.0  #: estimated local time for prefill + max_tokens of decode
    rates_source: str = "measured"  #: "measured" (edgec bench) or "assumed" (the policy's fallback rates)
    device: DeviceState = field(default_factory=DeviceState)
    cloud_configured: bool = True
    cloud_available: bool = True
    cloud_context: int | None = None
    cloud_cost_usd: float = 0.0  #: estimate for this request
    spent_usd: float = 0.0  #: spent on the cloud so far (this process)


# --- the declarative policy --------------------------------------------------------------------------------


@dataclass
class CloudSection:
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 60.0
    retries: int = 2
    breaker_failures: int = 3
    breaker_cooldown_s: float = 30.0
    context_length: int | None = None
    continuation: str = "prefix"
    usd_per_1k_prompt_tokens: float = 0.0
    usd_per_1k_completion_tokens: float = 0.0


@dataclass
class RouteSection:
    default: str = "local"
    deadline_s: float | None = None  #: budget for requests that name none


@dataclass
class PrivacySection:
    personal_data: str = "local"
    detect: list[str] = field(default_factory=lambda: ["email", "card", "iban", "phone", "ip"])


@dataclass
class CapabilitySection:
    min_answer_tokens: int = 16  #: the local side needs room for at least this many new tokens
    local_features: list[str] = field(default_factory=list)


@dataclass
class DeviceSection:
    min_battery_percent: float | None = 20.0
    max_temperature_c: float | None = 85.0
    min_memory_mb: float | None = 256.0


@dataclass
class DeadlineSection:
    #: used when ``edgec bench`` has stored no rates for the bundle on this device: deliberately slow
    assumed_prefill_tokens_per_second: float = 100.0
    assumed_decode_tokens_per_second: float = 10.0


@dataclass
class ConfidenceSection:
    window: int = 8  #: tokens
    min_probability: float = 0.25  #: hand off when the window's mean token probability falls below
    min_tokens: int = 8  #: never hand off before this many local tokens


@dataclass
class BudgetSection:
    max_usd: float | None = None  #: cloud spend per process


@dataclass
class AuditSection:
    path: str | None = None


_SECTIONS = {"cloud": CloudSection, "route": RouteSection, "privacy": PrivacySection, "capability": CapabilitySection,
             "device": DeviceSection, "deadline": DeadlineSection, "confidence": ConfidenceSection,
             "budget": BudgetSection, "audit": AuditSection}

Hook = Callable[[Signals, Decision], "Decision | None"]


@dataclass
class Policy:
    cloud: CloudSection = field(default_factory=CloudSection)
    route: RouteSection = field(default_factory=RouteSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    capability: CapabilitySection = field(default_factory=CapabilitySection)
    device: DeviceSection = field(default_factory=DeviceSection)
    deadline: DeadlineSection = field(default_factory=DeadlineSection)
    confidence: ConfidenceSection = field(default_factory=ConfidenceSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    audit: AuditSection = field(default_factory=AuditSection)
    hook: Hook | None = None

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        path = Path(path)
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise InputError(f"policy {path}: cannot read it ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"policy {path}: not valid TOML ({exc})") from None
        policy = cls.from_dict(data, where=str(path))
        # relative paths in the policy are relative to the policy file
        if policy.audit.path and not Path(policy.audit.path).is_absolute():
            policy.audit.path = str(path.parent / policy.audit.path)
        return policy

    @classmethod
    def from_dict(cls, data: dict, where: str = "policy") -> Policy:
        """Checked: unknown sections and keys, wrong types and out-of-range values are ``InputError``s."""
        unknown = sorted(set(data) - set(_SECTIONS) - {"hook"})
        if unknown:
            raise InputError(f"{where}: unknown section(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(_SECTIONS))}, hook")
        sections = {name: _section(kind, data.get(name, {}), f"{where} [{name}]") for name, kind in _SECTIONS.items()}
        hook = data.get("hook")
        if hook is not None:
            if not isinstance(hook, dict) or set(hook) != {"function"}:
                raise InputError(f"{where} [hook]: give one key, function = \"module:function\"")
            hook = load_hook(hook["function"], where)
        policy = cls(**sections, hook=hook)
        policy.check(where)
        return policy

    def check(self, where: str = "policy") -> Policy:
        problems = []
        if self.route.default not in ROUTES:
            problems.append(f"[route] default={self.route.default!r}: choose {', '.join(ROUTES)}")
        if self.privacy.personal_data not in PERSONAL_DATA_ACTIONS:
            problems.append(f"[privacy] personal_data={self.privacy.personal_data!r}: choose "
                            f"{', '.join(PERSONAL_DATA_ACTIONS)}")
        from edgec.runtime.privacy import KINDS

        if bad := sorted(set(self.privacy.detect) - set(KINDS)):
            problems.append(f"[privacy] detect: unknown kind(s) {', '.join(bad)}; known: {', '.join(KINDS)}")
        if (self.cloud.base_url is None) != (self.cloud.model is None):
            problems.append("[cloud] needs both base_url and model (or neither, for a device-only policy)")
        if not 0 < self.confidence.min_probability < 1 and self.confidence.min_probability != 0:
            problems.append(f"[confidence] min_probability={self.confidence.min_probability} must be in [0, 1)")
        if self.confidence.window < 1:
            problems.append(f"[confidence] window={self.confidence.window} must be >= 1")
        for name in ("assumed_prefill_tokens_per_second", "assumed_decode_tokens_per_second"):
            if not getattr(self.deadline, name) > 0:
                problems.append(f"[deadline] {name} must be > 0")
        if problems:
            raise InputError(f"{where}: " + "; ".join(problems))
        return self

    def cloud_model(self):
        """The ``CloudModel`` the ``[cloud]`` section describes, or None."""
        if self.cloud.base_url is None:
            return None
        from edgec.runtime.cloud import CloudModel

        c = self.cloud
        return CloudModel(c.base_url, c.model, api_key_env=c.api_key_env, connect_timeout=c.connect_timeout_s,
                          read_timeout=c.read_timeout_s, total_timeout=c.total_timeout_s, retries=c.retries,
                          breaker_failures=c.breaker_failures, breaker_cooldown=c.breaker_cooldown_s,
                          context_length=c.context_length, continuation=c.continuation)

    # --- the decision ---------------------------------------------------------------------------------------

    def decide(self, s: Signals) -> Decision:
        decision = self._rules(s)
        if self.hook is not None:
            replaced = self.hook(s, decision)
            if replaced is not None:
                if not isinstance(replaced, Decision) or replaced.route not in ROUTES:
                    raise InputError(f"the policy hook returned {replaced!r}: return a Decision with route in "
                                     f"{', '.join(ROUTES)}, or None to keep the policy's")
                decision = replaced
        return decision

    def _rules(self, s: Signals) -> Decision:
        reasons: list[Reason] = []
        fits = s.prompt_tokens + self.capability.min_answer_tokens <= s.local_context
        if s.local_only or (s.personal_data and self.privacy.personal_data == "local"):
            if s.local_only:
                reasons.append(Reason("local_only", "the request is marked local-only"))
            if s.personal_data and self.privacy.personal_data == "local":
                reasons.append(Reason("personal_data", f"personal data ({', '.join(s.personal_data)}) stays on the "
                                                       "device"))
            if not fits:
                reasons.append(_context_reason(s, self.capability.min_answer_tokens))
            return Decision("local", reasons)
        redact = bool(s.personal_data) and self.privacy.personal_data == "redact"
        if redact:
            reasons.append(Reason("redacted", f"personal data ({', '.join(s.personal_data)}) is redacted before "
                                              "it leaves the device"))
        if not s.cloud_configured:
            return Decision("local", reasons + [Reason("no_cloud", "the policy names no cloud endpoint")])
        if not fits:
            return Decision("cloud", reasons + [_context_reason(s, self.capability.min_answer_tokens)], redact)
        missing = sorted(s.features - set(self.capability.local_features))
        if missing:
            return Decision("cloud-then-local", reasons + [Reason("feature", f"the local model lacks "
                                                                             f"{', '.join(missing)}")], redact)
        if not s.cloud_available:
            return Decision("local", reasons + [Reason("cloud_unavailable", "the cloud failed repeatedly; its "
                                                                            "circuit breaker is open")])
        if self.budget.max_usd is not None and s.spent_usd + s.cloud_cost_usd > self.budget.max_usd:
            return Decision("local", reasons + [Reason("budget", f"the cloud budget of ${self.budget.max_usd:g} would "
                                                                 f"be exceeded (spent ${s.spent_usd:.4f}, this "
                                                                 f"request ~${s.cloud_cost_usd:.4f})")])
        device = self._device_reasons(s.device)
        if device:
            return Decision("cloud-then-local", reasons + device, redact)
        if s.deadline_s is not None and s.local_estimate_s > s.deadline_s:
            return Decision("cloud-then-local", reasons + [Reason(
                "deadline", f"the device needs ~{s.local_estimate_s:.2f} s ({s.rates_source} rates) for "
                            f"{s.prompt_tokens} prompt + {s.max_tokens} new tokens; the budget is "
                            f"{s.deadline_s:g} s")], redact)
        return Decision(self.route.default, reasons + [Reason("default", f"no rule fired; the policy's default is "
                                                                         f"{self.route.default}")], redact)

    def _device_reasons(self, d: DeviceState) -> list[Reason]:
        p, out = self.device, []
        if (p.min_battery_percent is not None and d.battery_percent is not None and d.charging is not True
                and d.battery_percent < p.min_battery_percent):
            out.append(Reason("battery_low", f"battery at {d.battery_percent:.0f}% and not charging "
                                             f"(policy minimum {p.min_battery_percent:g}%)"))
        if p.max_temperature_c is not None and d.temperature_c is not None and d.temperature_c > p.max_temperature_c:
            out.append(Reason("thermal", f"the device is at {d.temperature_c:.0f} °C (policy maximum "
                                         f"{p.max_temperature_c:g} °C)"))
        if (p.min_memory_mb is not None and d.memory_available_mb is not None
                and d.memory_available_mb < p.min_memory_mb):
            out.append(Reason("memory_low", f"{d.memory_available_mb:.0f} MB free memory (policy minimum "
                                            f"{p.min_memory_mb:g} MB)"))
        return out


def _context_reason(s: Signals, min_answer: int) -> Reason:
    return Reason("context", f"the prompt has {s.prompt_tokens} tokens; the local context of {s.local_context} "
                             f"leaves no room for a {min_answer}-token answer")


_CHECKS = {  # field annotation -> (check, what it must be)
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
}


def _section(kind: type, values: Any, where: str):
    if not isinstance(values, dict):
        raise InputError(f"{where}: must be a table of keys")
    known = {f.name: f.type for f in fields(kind)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for name, value in values.items():
        check, what = _CHECKS[known[name].removesuffix(" | None")]
        if not check(value):
            raise InputError(f"{where}: {name} = {value!r} must be {what}")
    return kind(**values)


def load_hook(spec: str, where: str = "policy") -> Hook:
    """``"package.module:function"`` -> the function (called as ``function(signals, decision)``)."""
    module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attr:
        raise InputError(f"{where} [hook]: function = {spec!r} must look like \"package.module:function\"")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise InputError(f"{where} [hook]: cannot import {module_name} ({exc})") from None
    except AttributeError:
        raise InputError(f"{where} [hook]: {module_name} has no {attr}") from None
    if not callable(fn):
        raise InputError(f"{where} [hook]: {spec} is not callable")
    return fn
