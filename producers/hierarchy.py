"""Object hierarchies proposed from the source's foreign keys: a pure graph analysis, its YAML, and the reflection.

A member must hold its root's id directly in one of its own columns, because that column becomes the record key
(Debezium's `message.key.columns`) of every change of the member. So only "ownership" foreign keys count: one
NOT NULL column referencing the single-column primary key of another captured table. A table reaching a root
only through other tables cannot be keyed by the root id without a join that Debezium does not do.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import yaml
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine, Inspector, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from cdc.errors import CdcError, ConfigError, ServiceUnavailable

# Hierarchy names become parts of topic names; the pipeline file accepts only these.
_HIERARCHY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_PLAIN_SCALAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.$-]*$")


# ---------------------------------------------------------------------------------------------------------------
# the graph model


@dataclass(frozen=True)
class Column:
    name: str
    nullable: bool


@dataclass(frozen=True)
class ForeignKey:
    columns: tuple[str, ...]
    referred_table: str  # schema-qualified
    referred_columns: tuple[str, ...]


@dataclass(frozen=True)
class SourceTable:
    name: str  # schema-qualified
    primary_key: tuple[str, ...]
    columns: tuple[Column, ...]
    foreign_keys: tuple[ForeignKey, ...] = ()

    def nullable(self, column: str) -> bool:
        # A column we were not told about is treated as nullable: it cannot be relied on to hold a root id.
        return next((c.nullable for c in self.columns if c.name == column), True)


# ---------------------------------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class Member:
    table: str
    column: str  # the member's column holding the root id
    # other (root, column) pairs this table also owns directly; the user may prefer one of them
    alternatives: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Hierarchy:
    name: str
    root: str
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Standalone:
    table: str
    note: str | None = None  # why a foreign key it has does not make it a member elsewhere


@dataclass(frozen=True)
class Unjoinable:
    table: str
    reason: str


@dataclass(frozen=True)
class Suggestion:
    hierarchies: tuple[Hierarchy, ...]
    standalone: tuple[Standalone, ...]
    unjoinable: tuple[Unjoinable, ...]

    def hierarchy(self, name: str) -> Hierarchy:
        for h in self.hierarchies:
            if h.name == name:
                return h
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------------------------
# the analysis


@dataclass(frozen=True)
class _Ownership:
    owner: str  # the table holding the column
    column: str
    root: str  # the table whose primary key it references


@dataclass
class _Graph:
    tables: dict[str, SourceTable]
    owns: dict[str, list[_Ownership]] = field(default_factory=dict)  # table -> its ownership FKs, sorted

    def successors(self, table: str) -> list[str]:
        return sorted({o.root for o in self.owns.get(table, [])})


def _single_pk(table: SourceTable) -> str | None:
    return table.primary_key[0] if len(table.primary_key) == 1 else None


def _ownership(table: SourceTable, fk: ForeignKey, tables: dict[str, SourceTable]) -> _Ownership | None:
    referred = tables.get(fk.referred_table)
    if referred is None or referred.name == table.name or len(fk.columns) != 1:
        return None
    if _single_pk(referred) is None or fk.referred_columns != referred.primary_key or table.nullable(fk.columns[0]):
        return None
    return _Ownership(table.name, fk.columns[0], referred.name)


def _why_not_ownership(table: SourceTable, tables: dict[str, SourceTable]) -> list[str]:
    """Plain-words reasons why each foreign key to another captured table is not an ownership one."""
    reasons = []
    for fk in sorted(table.foreign_keys, key=lambda f: (f.columns, f.referred_table)):
        referred = tables.get(fk.referred_table)
        if referred is None or referred.name == table.name or _ownership(table, fk, tables):
            continue
        cols = ", ".join(fk.columns)
        if len(fk.columns) != 1:
            reasons.append(f"({cols}) references {referred.name} with several columns")
        elif fk.referred_columns != referred.primary_key or _single_pk(referred) is None:
            reasons.append(f"{cols} references {referred.name} ({', '.join(fk.referred_columns)}), not its primary key")
        else:
            reasons.append(f"{cols} (references {referred.name}) is nullable")
    return reasons


def _walk(graph: _Graph, start: str) -> tuple[dict[str, tuple[int, str]], str | None]:
    """Breadth-first over ownership edges from `start`: each reached table's (depth, predecessor), and the
    predecessor through which the walk came back to `start`, if it did.

    Visiting each table once is what keeps ownership cycles from looping; sorted successors keep it deterministic.
    """
    reached: dict[str, tuple[int, str]] = {}
    back: str | None = None
    queue = deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        for nxt in graph.successors(node):
            if nxt == start:
                back = back or node
            elif nxt not in reached:
                reached[nxt] = (depth + 1, node)
                queue.append((nxt, depth + 1))
    return reached, back


def _path(reached: dict[str, tuple[int, str]], start: str, end: str) -> list[str]:
    path = [end]
    while path[-1] != start:
        path.append(reached[path[-1]][1])
    return path[::-1]


def _cycle_through(graph: _Graph, table: str) -> list[str] | None:
    reached, back = _walk(graph, table)
    return [*_path(reached, table, back), table] if back else None


def _hierarchy_names(roots: list[str]) -> dict[str, str]:
    """The root's table name without its schema; schema-prefixed when two schemas would give the same name."""

    def clean(text: str) -> str:
        text = re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("_-")
        return text if _HIERARCHY_NAME_RE.match(text) else f"h_{text}".rstrip("_")

    bare = {root: clean(root.split(".", 1)[-1]) for root in roots}
    names = {root: (clean(root.replace(".", "_")) if list(bare.values()).count(bare[root]) > 1 else bare[root])
             for root in roots}
    taken: set[str] = set()
    for root in sorted(roots):
        # Only pathological names still clash (public.person, sales.person and a table named sales_person).
        name, n = names[root], 2
        while names[root] in taken:
            names[root] = f"{name}_{n}"
            n += 1
        taken.add(names[root])
    return names


def suggest(tables: Iterable[SourceTable]) -> Suggestion:
    """Propose hierarchies over the given (captured) tables.

    1. Ownership FKs: single NOT NULL column -> the single-column primary key of another captured table.
    2. Candidate roots: tables with a single-column primary key and no ownership FK.
    3. Each other table joins a candidate root it owns directly; with several, the root owned directly by
       the most tables wins (ties by name), and the others are kept as alternatives.
    4. Candidate roots without members are standalone; every other table cannot join, with the reason.
    """
    by_name = {t.name: t for t in tables}
    graph = _Graph(by_name)
    for name in sorted(by_name):
        owned = [o for fk in by_name[name].foreign_keys if (o := _ownership(by_name[name], fk, by_name))]
        if owned:
            graph.owns[name] = sorted(set(owned), key=lambda o: (o.root, o.column))

    roots = {name for name, t in by_name.items() if _single_pk(t) is not None and name not in graph.owns}
    owners_of: dict[str, set[str]] = {root: set() for root in roots}
    for owned in graph.owns.values():
        for o in owned:
            if o.root in roots:
                owners_of[o.root].add(o.owner)

    def rank(root: str) -> tuple[int, str]:
        return (-len(owners_of[root]), root)

    members: dict[str, list[Member]] = {root: [] for root in roots}
    unjoinable: list[Unjoinable] = []
    for name in sorted(set(by_name) - roots):
        direct = sorted((o for o in graph.owns.get(name, []) if o.root in roots),
                        key=lambda o: (rank(o.root), o.column))
        if direct:
            chosen, *others = direct
            members[chosen.root].append(
                Member(name, chosen.column, tuple(sorted((o.root, o.column) for o in others))))
        else:
            unjoinable.append(Unjoinable(name, _reason(graph, name, roots, rank)))

    joined = sorted(root for root in roots if members[root])
    names = _hierarchy_names(joined)
    hierarchies = sorted((Hierarchy(names[root], root, tuple(members[root])) for root in joined),
                         key=lambda h: h.name)
    standalone = []
    for root in sorted(root for root in roots if not members[root]):
        why = _why_not_ownership(by_name[root], by_name)
        standalone.append(Standalone(root, f"not a member: {'; '.join(why)}" if why else None))
    return Suggestion(tuple(hierarchies), tuple(standalone), tuple(unjoinable))


def _reason(graph: _Graph, table: str, roots: set[str], rank: Callable[[str], tuple[int, str]]) -> str:
    reached, _ = _walk(graph, table)
    nearest = sorted((reached[r][0], rank(r), r) for r in roots if r in reached)
    if nearest:
        root = nearest[0][2]
        through = _path(reached, table, root)[1:-1]
        return (f"reaches {root} only through {' -> '.join(through)}; "
                f"add a column holding the {root.split('.', 1)[-1]} id")
    if table in graph.owns:
        # Following ownership FKs never ends at a root, so it ends in a cycle: either through this table or ahead.
        cycle = _cycle_through(graph, table)
        if cycle:
            return f"ownership cycle: {' -> '.join(cycle)}"
        ahead = min((depth, t) for t, (depth, _) in reached.items() if _cycle_through(graph, t))[1]
        return f"its owners form an ownership cycle: {' -> '.join(_cycle_through(graph, ahead) or [])}"
    source = graph.tables[table]
    pk = (f"no single-column primary key ({', '.join(source.primary_key)})" if source.primary_key
          else "no primary key")
    why = _why_not_ownership(source, graph.tables)
    fks = f"no ownership foreign key: {'; '.join(why)}" if why else "no foreign key to a captured table"
    return f"{pk}, so it cannot be a root; and {fks}"


# ---------------------------------------------------------------------------------------------------------------
# the YAML proposal


def _scalar(text: str) -> str:
    # Plain only when YAML reads it back as the same string (a column named `on` or `null` would not).
    if _PLAIN_SCALAR_RE.match(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render_yaml(result: Suggestion) -> str:
    """The `hierarchies` section of a pipeline file, with what did not fit said in comments."""
    lines = ["hierarchies:" if result.hierarchies else "hierarchies: {}"]
    for h in result.hierarchies:
        lines += [f"  {_scalar(h.name)}:", f"    root: {_scalar(h.root)}", "    members:"]
        for m in h.members:
            line = f"      {_scalar(m.table)}: {_scalar(m.column)}"
            if m.alternatives:
                also = ", ".join(f"{root} ({column})" for root, column in m.alternatives)
                line += f"  # also references {_one_line(also)}"
            lines.append(line)
    if result.standalone:
        tables = ", ".join(_one_line(s.table) for s in result.standalone)
        lines.append(f"# standalone (no member rows belong to them): {tables}")
        lines += [f"#   {_one_line(s.table)}: {_one_line(s.note)}" for s in result.standalone if s.note]
    if result.unjoinable:
        lines.append("# cannot join a hierarchy:")
        lines += [f"#   {_one_line(u.table)}: {_one_line(u.reason)}" for u in result.unjoinable]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# reflection from the source database


def _split(name: str) -> tuple[str, str]:
    schema, sep, table = name.partition(".")
    if not sep or not schema or not table:
        raise ConfigError(f"--tables: {name!r} is not schema-qualified (write e.g. public.{name})")
    return schema, table


def _engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
        # The pipeline file writes plain postgresql:// URLs; psycopg 3 is the driver this project installs.
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        engine = create_engine(parsed)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigError(f"--url: not a usable SQLAlchemy URL ({exc})") from None
    return engine


def _with_inspector(url: str, work: Callable[[Inspector], list[SourceTable]]) -> list[SourceTable]:
    engine = _engine(url)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            return work(inspect(conn))
    except OperationalError as exc:
        raise ServiceUnavailable(f"source database {shown} did not answer: {_one_line(str(exc.orig))}") from exc
    except DBAPIError as exc:
        raise CdcError(f"reading the foreign keys of {shown} failed: {_one_line(str(exc.orig))}") from exc
    finally:
        engine.dispose()


def _reflect(inspector: Inspector, names: list[str]) -> list[SourceTable]:
    default_schema = inspector.default_schema_name
    wanted = [_split(n) for n in dict.fromkeys(names)]
    present = {schema: set(inspector.get_table_names(schema=schema)) for schema in {s for s, _ in wanted}}
    missing = [f"{s}.{t}" for s, t in wanted if t not in present[s]]
    if missing:
        raise ConfigError(f"--tables: no such table at the source: {', '.join(missing)}")
    tables = []
    for schema, table in wanted:
        pk = inspector.get_pk_constraint(table, schema=schema).get("constrained_columns") or []
        columns = tuple(Column(c["name"], bool(c["nullable"])) for c in inspector.get_columns(table, schema=schema))
        fks = tuple(
            # PostgreSQL leaves out the schema of a referred table that is on the search path.
            ForeignKey(tuple(fk["constrained_columns"]),
                       f"{fk.get('referred_schema') or default_schema}.{fk['referred_table']}",
                       tuple(fk["referred_columns"]))
            for fk in inspector.get_foreign_keys(table, schema=schema))
        tables.append(SourceTable(f"{schema}.{table}", tuple(pk), columns, fks))
    return tables


def reflect_source(url: str, tables: list[str]) -> list[SourceTable]:
    """The graph model of the named source tables; ConfigError naming any that do not exist."""
    if not tables:
        raise ConfigError("--tables: name at least one schema-qualified table")
    return _with_inspector(url, lambda inspector: _reflect(inspector, tables))


def reflect_schema(url: str, schema: str = "public") -> list[SourceTable]:
    """The graph model of every table of one schema of the source."""

    def work(inspector: Inspector) -> list[SourceTable]:
        names = [f"{schema}.{t}" for t in sorted(inspector.get_table_names(schema=schema))]
        if not names:
            raise ConfigError(f"--schema: the source has no tables in schema {schema!r}")
        return _reflect(inspector, names)

    return _with_inspector(url, work)
