"""MkDocs hook: the table of every ``MSIGHT_*`` variable, generated from config.py.

``src/msight_core/config.py`` is the only reader of the environment; each loader
reads a variable with one typed call, ``e.<kind>("MSIGHT_...", default)``, and
passes the value to a field of a frozen dataclass. This hook reads that source
(with :mod:`ast`, so the docs never disagree with the code) and writes, in place
of the ``<!-- msight-config-variables -->`` marker of a page, one table per
dataclass with each variable's name, type, default and meaning:

- the *name* is the call's first argument (``p + "HOST"`` with ``p`` a string
  constant of the same function is resolved);
- the *type* follows from the call kind (``bool``, ``int``, ``secret`` ...) and,
  for enums, the field's annotation;
- the *default* is the dataclass field's default, from the imported module;
- the *meaning* is the field's attribute docstring in config.py, or else the
  short text in :data:`FIELD_MEANINGS` below for the plain connection settings
  that have none.

A variable whose meaning cannot be found, or a marker on a page that is missing,
fails the build. ``tests/docs/test_docs_build.py`` checks that every
``MSIGHT_`` string in config.py appears in the table.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "<!-- msight-config-variables -->"
CONFIG_PY = Path(__file__).resolve().parents[2] / "src" / "msight_core" / "config.py"
MODULE = "msight_core.config"

#: Meanings of fields that carry no attribute docstring in config.py (plain
#: connection settings). A field documented in config.py wins over this table.
FIELD_MEANINGS: dict[str, str] = {
    "host": "Server host name or address.",
    "port": "Server TCP port.",
    "db": "Database number (0 on a cluster, which has only database 0).",
    "username": "User name to authenticate with.",
    "password": "Password to authenticate with.",
    "token": "Authentication token.",
    "nkey_seed": "NKey seed to sign the server's challenge with (alone, or with a user JWT).",
    "user_jwt": "User JWT (decentralized auth); needs `MSIGHT_NATS_NKEY_SEED`.",
    "user_credentials": "Path of a `.creds` file (user JWT and seed).",
    "use_tls": "Connect with TLS.",
    "tls_verify": "Verify the server's certificate and host name.",
    "tls_ca_cert_file": "CA certificate file to verify the server with.",
    "tls_cert_file": "Client certificate file (mutual TLS).",
    "tls_key_file": "Client private key file (mutual TLS).",
    "use_cluster": "Talk to a Redis Cluster (sharded pub/sub, `SPUBLISH`/`SSUBSCRIBE`).",
    "cluster_nodes": "Cluster nodes to learn the slot map from (`host:port` list); "
    "default: host and port.",
    "connect_timeout": "Seconds to wait for a connection before `BrokerUnavailableError`.",
    "servers": "Servers to connect to, as `a,b` or the seed's `\"['a', 'b']\"`.",
    "name": "Client name shown by the server (monitoring).",
    "sasl_mechanism": "SASL mechanism (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`); unset: no SASL.",
    "sasl_username": "SASL user name.",
    "sasl_password": "SASL password.",
    "max_messages": "Messages a subscriber holds for the application at most.",
    "max_bytes": "Bytes a subscriber holds for the application at most.",
    "overflow": "What a full receive queue does with a new message.",
    "buffer_bytes": "Bytes `publish()` buffers while the broker is away, at most.",
    "timeout": "Seconds `publish()`/`flush()` wait for room or for the broker before "
    "`BackpressureError`.",
    "producer": "librdkafka producer properties: `MSIGHT_KAFKA_PRODUCER_LINGER_MS=5` "
    "sets `linger.ms`.",
    "consumer": "librdkafka consumer properties: `MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS"
    "=6000` sets `session.timeout.ms`.",
    "client": "librdkafka properties for producer and consumer alike, applied last.",
}

_KINDS = {
    "str": "string",
    "secret": "secret (shown as `***`)",
    "bool": "boolean",
    "int": "integer",
    "float": "number",
    "servers": "server list",
    "prefixed": "properties",
}


@dataclass(frozen=True)
class Variable:
    """One ``MSIGHT_*`` variable (a name ending in ``*`` is a prefix)."""

    name: str
    kind: str
    type: str
    default: str
    meaning: str
    config_class: str | None
    field: str | None


class ExtractionError(RuntimeError):
    """config.py changed in a way this hook does not understand."""


def variables(path: Path = CONFIG_PY) -> list[Variable]:
    """Every variable read by config.py, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = importlib.import_module(MODULE)
    field_docs = _field_docstrings(tree)
    out: list[Variable] = []
    for func in tree.body:
        if isinstance(func, ast.FunctionDef):
            out.extend(_from_function(func, module, field_docs))
    return out


def markdown(path: Path = CONFIG_PY) -> str:
    """The tables, one per configuration class, as Markdown."""
    module = importlib.import_module(MODULE)
    groups: dict[str | None, list[Variable]] = {}
    for var in variables(path):
        groups.setdefault(var.config_class, []).append(var)
    parts = []
    shared = _shared_classes(module, groups)
    order = sorted(groups, key=lambda name: (name is not None, name in shared))
    for cls_name in order:
        rows = groups[cls_name]
        if cls_name is None:
            title, intro = "Backend", "Which backend `get_pubsub()` and the nodes build."
        else:
            doc = inspect.getdoc(getattr(module, cls_name)) or ""
            title = cls_name
            intro = f"{doc.splitlines()[0]} See [`{cls_name}`][{MODULE}.{cls_name}]."
            if cls_name in shared:
                intro += " Read for every backend."
        parts.append(f"### {title}\n\n{intro}\n")
        parts.append("| Variable | Type | Default | Meaning |\n|---|---|---|---|")
        for v in rows:
            meaning = " ".join(v.meaning.split()).replace("|", "\\|")
            parts.append(f"| `{v.name}` | {v.type} | {v.default} | {meaning} |")
        parts.append("")
    return "\n".join(parts)


def _shared_classes(module: Any, groups: dict[str | None, list[Variable]]) -> set[str]:
    """Config classes that are a field of another one (queue, publish): every backend's."""
    shared = set()
    for name in groups:
        if name is None:
            continue
        for f in dataclasses.fields(getattr(module, name)):
            default = _field_default(f)
            if dataclasses.is_dataclass(default):
                shared.add(type(default).__name__)
    return shared


# -- mkdocs hook ---------------------------------------------------------------------


def on_page_markdown(markdown_text: str, page: Any, **kwargs: Any) -> str:
    if MARKER not in markdown_text:
        return markdown_text
    return markdown_text.replace(MARKER, markdown())


# -- extraction ----------------------------------------------------------------------


def _field_docstrings(tree: ast.Module) -> dict[tuple[str, str], str]:
    """(class, field) -> the string literal right below the field's annotation."""
    docs: dict[tuple[str, str], str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for first, second in itertools.pairwise(body):
            if (
                isinstance(first, ast.AnnAssign)
                and isinstance(first.target, ast.Name)
                and isinstance(second, ast.Expr)
                and isinstance(second.value, ast.Constant)
                and isinstance(second.value.value, str)
            ):
                docs[(node.name, first.target.id)] = inspect.cleandoc(second.value.value)
    return docs


def _walk_with_parents(node: ast.AST) -> Iterator[tuple[ast.AST, list[ast.AST]]]:
    stack: list[tuple[ast.AST, list[ast.AST]]] = [(node, [])]
    while stack:
        current, parents = stack.pop()
        yield current, parents
        for child in reversed(list(ast.iter_child_nodes(current))):
            stack.append((child, [*parents, current]))


def _from_function(
    func: ast.FunctionDef, module: Any, field_docs: dict[tuple[str, str], str]
) -> list[Variable]:
    strings: dict[str, str] = {}  # local name -> string constant (the prefix `p`)
    env_names: set[str] = set()  # local names bound to _Env(...)
    config_call: ast.Call | None = None
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            if not isinstance(target, ast.Name):
                continue
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                strings[target.id] = value.value
            elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
                if value.func.id == "_Env":
                    env_names.add(target.id)
                elif _is_config_class(module, value.func.id):
                    config_call = value
    cls_name = config_call.func.id if config_call is not None else None  # type: ignore[union-attr]
    cls = getattr(module, cls_name) if cls_name else None
    out = []
    for node, parents in _walk_with_parents(func):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and _is_env(node.func.value, env_names)
            and node.func.attr in _KINDS
        ):
            continue
        name = _string(node.args[0], strings) if node.args else None
        if name is None:
            raise ExtractionError(f"{func.name}: cannot read the variable name of a call")
        kind = node.func.attr
        field = _field_of(parents, config_call, cls)
        if kind == "prefixed":
            name += "*"
        meaning = _meaning(cls_name, field, func, field_docs, name)
        out.append(
            Variable(
                name=name,
                kind=kind,
                type=_type(kind, cls, field, func, module, meaning),
                default=_default(cls, field, func),
                meaning=meaning,
                config_class=cls_name,
                field=field,
            )
        )
    return out


def _is_env(node: ast.AST, env_names: set[str]) -> bool:
    """``e`` (bound to ``_Env(env)``) or ``_Env(env)`` itself."""
    if isinstance(node, ast.Name):
        return node.id in env_names
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_Env"


def _is_config_class(module: Any, name: str) -> bool:
    obj = getattr(module, name, None)
    return isinstance(obj, type) and dataclasses.is_dataclass(obj) and name.endswith("Config")


def _string(node: ast.AST, strings: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return strings.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string(node.left, strings), _string(node.right, strings)
        if left is not None and right is not None:
            return left + right
    return None


def _field_of(parents: list[ast.AST], config_call: ast.Call | None, cls: Any) -> str | None:
    """The dataclass field a read value goes to: its keyword, or its local name."""
    if cls is None:
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    for parent in reversed(parents):
        if isinstance(parent, ast.keyword) and parent.arg in fields:
            return parent.arg
        if isinstance(parent, ast.Assign):
            target = parent.targets[0]
            if isinstance(target, ast.Name):
                if target.id in fields:
                    return target.id
                for kw in config_call.keywords if config_call is not None else ():
                    if isinstance(kw.value, ast.Name) and kw.value.id == target.id:
                        return kw.arg
    return None


def _field(cls: Any, name: str | None) -> dataclasses.Field[Any] | None:
    for f in dataclasses.fields(cls) if cls is not None else ():
        if f.name == name:
            return f
    return None


def _type(
    kind: str, cls: Any, field: str | None, func: ast.FunctionDef, module: Any, meaning: str
) -> str:
    if cls is not None and field is not None:
        default = _field_default(_field(cls, field))
        if isinstance(default, enum.Enum):
            return "one of " + ", ".join(f"`{m.value}`" for m in type(default))
    if cls is None and func.name == "backend_name":
        return "one of " + ", ".join(f"`{b}`" for b in module.BACKENDS)
    if kind == "float":
        return "seconds" if "second" in meaning.lower() else "number"
    return _KINDS[kind]


def _field_default(f: dataclasses.Field[Any] | None) -> Any:
    if f is None:
        return dataclasses.MISSING
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _default(cls: Any, field: str | None, func: ast.FunctionDef) -> str:
    value = _field_default(_field(cls, field))
    if value is dataclasses.MISSING:
        value = _none_return(func)
    return _show(value)


def _none_return(func: ast.FunctionDef) -> Any:
    """``if value is None: return "redis"`` -> ``"redis"`` (a loader without a class)."""
    for node in ast.walk(func):
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.ops[0], ast.Is)
            and isinstance(node.test.comparators[0], ast.Constant)
            and node.test.comparators[0].value is None
            and isinstance(node.body[0], ast.Return)
            and isinstance(node.body[0].value, ast.Constant)
        ):
            return node.body[0].value.value
    raise ExtractionError(f"{func.name}: no default found")


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int):
        mib = 1024 * 1024
        if value >= mib and value % mib == 0:
            return f"`{value}` ({value // mib} MiB)"
        return f"`{value}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, tuple):
        return "`" + ",".join(value) + "`" if value else "none"
    if isinstance(value, dict):
        return "none"
    return f"`{value}`"


def _without_name(text: str, var: str) -> str:
    """Drop the ``(``MSIGHT_X``)`` a field docstring ends with: the table names it."""
    text = text.replace(f" (``{var}``)", "").replace(f"(``{var}``)", "")
    return text.replace(f"; ``{var}``)", ")")


def _meaning(
    cls_name: str | None,
    field: str | None,
    func: ast.FunctionDef,
    field_docs: dict[tuple[str, str], str],
    var: str,
) -> str:
    if cls_name is None:
        doc = ast.get_docstring(func)
        if doc:
            return doc.splitlines()[0]
    elif field is not None:
        doc = field_docs.get((cls_name, field)) or FIELD_MEANINGS.get(field)
        if doc:
            return _without_name(doc, var)
    raise ExtractionError(
        f"{var}: no meaning found; add a docstring under the field {cls_name}.{field} in config.py"
    )
