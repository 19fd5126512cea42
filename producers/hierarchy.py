"""Object hierarchies proposed from the source's foreign keys and row estimates: a pure graph analysis, its YAML
with the reason for every choice, and the reflection of the source (every schema in one pass).

A member must hold its root's id directly in one of its own columns, because that column becomes the record key
(Debezium's `message.key.columns`) of every change of the member. So only "ownership" links count: one column
referencing the single-column primary key of another captured table. A NOT NULL column is strong evidence; a
nullable one is accepted as weaker evidence (a row may belong to no root). A table reaching a root only through
other tables cannot be keyed by the root id without a join that Debezium does not do.

Roots are the tables that own rows (a customer and its rentals and payments), never lookup tables: rooting at
`language` would put every film under its language_id and strand the film's own rows. How it is decided:

1. Links. Two tables referencing each other (store.manager_staff_id, staff.store_id) are an association: neither
   link counts, unless one is nullable and the other is not (then the NOT NULL one is the ownership).
2. Reference data (language, category, country, city, address...) is neither a root nor a member. A table is
   reference data when it is referenced, holds links only to reference data, and either is small against the
   tables referencing it (row estimates: pg_class.reltuples) or is referenced only by tables that have
   dependants of their own (they own rows; it describes them) while being narrow (a few columns) or shared by
   several tables.
3. Roots, greedily: the other tables with a single-column primary key, those whose id is held by the most tables
   first. One that holds (NOT NULL) the id of a root already chosen becomes a member instead; one whose holders
   are all roots owns nothing and stays standalone (or a member, through a nullable column).
4. Members: every other table holding a root's id joins one of them, preferring a NOT NULL column, then
   ON DELETE CASCADE, then a column that is part of its primary key (a junction such as film_actor belongs to
   the side it is named after), then a name beginning with the root's name, then the root held by more tables.

Everything here is pure except the reading of the source at the end (cdc/source_tables.py); each decision carries
its reason into the YAML.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import yaml
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from cdc.errors import CdcError, ConfigError, ServiceUnavailable
from cdc.source_tables import ForeignKeyShape, TableShape, reflect_tables, source_url

# Hierarchy names become parts of topic names; the pipeline file accepts only these.
_HIERARCHY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_PLAIN_SCALAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.$-]*$")

# A referenced table this small (row estimate), against a referencing table ten times larger, is a lookup:
# a root with a handful of rows would also put all of its members' changes under a handful of keys.
SMALL_TABLE_ROWS = 100
SMALL_TABLE_RATIO = 10
# At most this many columns (language_id, name, last_update; city_id, city, country_id, last_update): a lookup's shape.
LOOKUP_COLUMNS = 4


# ---------------------------------------------------------------------------------------------------------------
# the graph: cdc/source_tables.py's TableShape, of which the analysis reads the primary key, the columns (names and
# nullability), the foreign keys (with ON DELETE) and the row estimate (None: unknown, never analysed)


# ---------------------------------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class Member:
    table: str
    column: str  # the member's column holding the root id
    # other roots this table also holds the id of, as (root, column); the user may prefer one of them
    alternatives: tuple[tuple[str, str], ...] = ()
    why: str | None = None  # why this root, and why not what else it references
    nullable: bool = False  # the root-id column is nullable: weaker evidence, a row may belong to no root


@dataclass(frozen=True)
class Hierarchy:
    name: str
    root: str
    members: tuple[Member, ...]
    why: str = ""  # why this table is a root


@dataclass(frozen=True)
class Standalone:
    table: str
    note: str | None = None  # why no hierarchy holds it
    reference: bool = False  # reference data (a lookup table)


@dataclass(frozen=True)
class Unjoinable:
    table: str
    reason: str


@dataclass(frozen=True)
class Suggestion:
    hierarchies: tuple[Hierarchy, ...]
    standalone: tuple[Standalone, ...]
    unjoinable: tuple[Unjoinable, ...]
    unestimated: tuple[str, ...] = ()  # tables without a row estimate: reference data told from foreign keys alone

    def hierarchy(self, name: str) -> Hierarchy:
        for h in self.hierarchies:
            if h.name == name:
                return h
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------------------------
# the analysis


@dataclass(frozen=True)
class _Link:
    """An ownership link: `child.column` holds the id of `parent` (its single-column primary key)."""

    child: str
    column: str
    parent: str
    nullable: bool
    cascade: bool  # ON DELETE CASCADE: deleting the parent deletes the child's rows
    in_key: bool  # the column is part of the child's primary key (a junction or a detail row)

    @property
    def shown(self) -> str:
        return f"{self.parent} ({self.column})"


def _single_pk(table: TableShape) -> str | None:
    return table.primary_key[0] if len(table.primary_key) == 1 else None


def _bare(name: str) -> str:
    return name.split(".", 1)[-1]


def _rows(rows: float) -> str:
    return f"~{round(rows):,} row{'' if round(rows) == 1 else 's'}"


def _named_after(child: str, parent: str) -> bool:
    """film_actor, FilmActor and "Film Actor" are named after film; filmography is not."""
    c, p = _bare(child), _bare(parent)
    if len(c) <= len(p) or not c.lower().startswith(p.lower()):
        return False
    nxt = c[len(p)]
    return not nxt.isalnum() or (p[-1].islower() and nxt.isupper())


def _link(table: TableShape, fk: ForeignKeyShape, tables: dict[str, TableShape]) -> _Link | None:
    referred = tables.get(fk.referred_table)
    if referred is None or referred.name == table.name or len(fk.columns) != 1:
        return None
    if _single_pk(referred) is None or fk.referred_columns != referred.primary_key:
        return None
    column = fk.columns[0]
    return _Link(table.name, column, referred.name, table.nullable(column),
                 (fk.ondelete or "").upper() == "CASCADE", column in table.primary_key)


def _why_not_link(table: TableShape, tables: dict[str, TableShape]) -> list[str]:
    """Plain-words reasons why each foreign key to another captured table is not an ownership link."""
    reasons = []
    for fk in sorted(table.foreign_keys, key=lambda f: (f.columns, f.referred_table)):
        referred = tables.get(fk.referred_table)
        if referred is None or referred.name == table.name or _link(table, fk, tables):
            continue
        cols = ", ".join(fk.columns)
        if len(fk.columns) != 1:
            reasons.append(f"({cols}) references {referred.name} with several columns")
        else:
            reasons.append(f"{cols} references {referred.name} ({', '.join(fk.referred_columns)}), not its primary key")
    return reasons


def _walk(successors: Callable[[str], list[str]], start: str) -> dict[str, tuple[int, str]]:
    """Breadth-first from `start`: each reached table's (depth, predecessor). Visiting each table once is what
    keeps cycles from looping; sorted successors keep it deterministic."""
    reached: dict[str, tuple[int, str]] = {}
    queue = deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        for nxt in successors(node):
            if nxt != start and nxt not in reached:
                reached[nxt] = (depth + 1, node)
                queue.append((nxt, depth + 1))
    return reached


def _path(reached: dict[str, tuple[int, str]], start: str, end: str) -> list[str]:
    path = [end]
    while path[-1] != start:
        path.append(reached[path[-1]][1])
    return path[::-1]


def _hierarchy_names(roots: list[str]) -> dict[str, str]:
    """The root's table name without its schema; schema-prefixed when two schemas would give the same name."""

    def clean(text: str) -> str:
        text = re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("_-")
        return text if _HIERARCHY_NAME_RE.match(text) else f"h_{text}".rstrip("_")

    bare = {root: clean(_bare(root)) for root in roots}
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


class _Analysis:
    """One run of the four steps of the module docstring over the captured tables; every decision keeps its reason."""

    def __init__(self, tables: Iterable[TableShape]) -> None:
        self.tables = {t.name: t for t in tables}
        self.associations: dict[str, list[str]] = {}  # table -> why links with a partner were set aside
        self.links = self._links()
        self.links_from: dict[str, list[_Link]] = {name: [] for name in self.tables}
        self.links_to: dict[str, list[_Link]] = {name: [] for name in self.tables}
        for link in self.links:
            self.links_from[link.child].append(link)
            self.links_to[link.parent].append(link)
        self.reference = self._reference()
        self.roots = self._roots()
        self.holders = {t: sorted({link.child for link in self.links_to[t]}) for t in self.tables}
        self.member_of = self._members()

    # -- step 1
    def _links(self) -> list[_Link]:
        found = {link for name in sorted(self.tables) for fk in self.tables[name].foreign_keys
                 if (link := _link(self.tables[name], fk, self.tables))}
        kept = []
        for link in sorted(found, key=lambda k: (k.child, k.parent, k.column)):
            back = [b for b in found if b.child == link.parent and b.parent == link.child]
            if not back:
                kept.append(link)
                continue
            mine_strong = any(not f.nullable for f in found if f.child == link.child and f.parent == link.parent)
            back_strong = any(not b.nullable for b in back)
            if mine_strong and not back_strong:
                kept.append(link)  # the other side only points back (person.current_enrollment_id): ours owns
                continue
            if back_strong and not mine_strong:
                why = (f"its nullable {link.column} only points back at {link.parent}, "
                       "which holds its id NOT NULL")
            else:
                why = (f"it and {link.parent} reference each other ({link.column}; "
                       f"{', '.join(sorted(b.column for b in back))}): neither owns the other")
            notes = self.associations.setdefault(link.child, [])
            if why not in notes:
                notes.append(why)
        return kept

    # -- step 2
    def _small(self, name: str) -> str | None:
        rows = self.tables[name].rows
        # (rows, name) of the tables referencing it whose size is known
        referencers = [(n, child) for link in self.links_to[name]
                       if (n := self.tables[(child := link.child)].rows) is not None]
        if rows is None or not referencers:
            return None
        biggest_rows, biggest = max(referencers)
        if rows <= SMALL_TABLE_ROWS and biggest_rows >= SMALL_TABLE_RATIO * max(rows, 10):
            return f"{_rows(rows)} against {_rows(biggest_rows)} in {biggest}, which references it"
        return None

    def _describes(self, name: str) -> str | None:
        # Lookups are narrow (id, name, last_update) or shared by several kinds of rows (an address of customers,
        # staff and stores); a wide table referenced by one table (customer <- order) may well own its rows.
        referencers = sorted({link.child for link in self.links_to[name]})
        narrow = len(self.tables[name].columns) <= LOOKUP_COLUMNS
        if (referencers and (narrow or len(referencers) > 1)
                and all({d.child for d in self.links_to[r]} - {r, name} for r in referencers)):
            return (f"every table referencing it ({', '.join(referencers)}) has dependants of its own: "
                    "it describes their rows rather than owning them")
        return None

    def _reference(self) -> dict[str, str]:
        reference = {name: why for name, t in self.tables.items()
                     if _single_pk(t) and self.links_to[name] and (why := self._small(name) or self._describes(name))}
        changed = True
        while changed:  # the greatest fixpoint: store and staff, both small and referencing each other, stay
            changed = False
            for name in sorted(reference):
                if any(link.parent not in reference for link in self.links_from[name]):
                    del reference[name]
                    changed = True
        return reference

    # -- step 3
    def _rank(self, name: str) -> tuple[int, int, int, float, str]:
        """Who is a root first: held (NOT NULL) by more tables, then held by more tables, then owned by fewer (a
        table holding another candidate's id may be its member), then more rows (more keys), then the name."""
        links = self.links_to[name]
        owners = {k.parent for k in self.links_from[name] if k.parent not in self.reference}
        return (-len({k.child for k in links if not k.nullable}), -len({k.child for k in links}), len(owners),
                -(self.tables[name].rows or 0), name)

    def _roots(self) -> list[str]:
        candidates = sorted((n for n, t in self.tables.items() if n not in self.reference and _single_pk(t)),
                            key=self._rank)
        roots: list[str] = []
        for name in candidates:
            held = [link for link in self.links_from[name] if link.parent in roots]
            if any(not link.nullable for link in held):
                continue  # it holds the id of a root that owns more: it is a member
            if all(link.child in roots for link in self.links_to[name]):
                continue  # nothing left for it to own (then a nullable root id still makes it a member)
            roots.append(name)  # a nullable root id is too weak to make an owner a member
        return roots

    # -- step 4
    def _preference(self, link: _Link) -> tuple:
        return (link.nullable, not link.cascade, not link.in_key, not _named_after(link.child, link.parent),
                self._rank(link.parent), link.column)

    def _members(self) -> dict[str, _Link]:
        member_of = {}
        for name in sorted(self.tables):
            if name in self.roots or name in self.reference:
                continue
            options = sorted((k for k in self.links_from[name] if k.parent in self.roots), key=self._preference)
            if options:
                member_of[name] = options[0]
        return member_of

    # -- the reasons
    def _why_over(self, win: _Link, lose: _Link) -> str:
        """The first preference that put `win` before `lose`, in words."""
        if win.nullable != lose.nullable:
            return f"{win.column} is NOT NULL and {lose.column} is not"
        if win.cascade != lose.cascade:
            return f"{win.column} is ON DELETE CASCADE"
        if win.in_key != lose.in_key:
            return f"{win.column} is part of its primary key"
        if win.parent == lose.parent:
            return f"{win.column} comes first by name"
        if _named_after(win.child, win.parent) != _named_after(lose.child, lose.parent):
            return f"{_bare(win.child)} is named after {_bare(win.parent)}"
        return self._why_first(win.parent, lose.parent)

    def _why_first(self, win: str, lose: str) -> str:
        a, b = self._rank(win), self._rank(lose)
        if a[0] != b[0]:
            return f"{win} is held NOT NULL by more tables ({-a[0]} against {-b[0]})"
        if a[1] != b[1]:
            return f"{win} is held by more tables ({-a[1]} against {-b[1]})"
        if a[2] != b[2]:
            return f"{win} references fewer tables that could own it ({a[2]} against {b[2]})"
        if a[3] != b[3]:
            return f"{win} has more rows ({_rows(-a[3])} against {_rows(-b[3])}): more keys to spread"
        return f"{win} and {lose} are held by as many tables, and {win} comes first by name"

    def _where(self, name: str) -> str:
        """What became of a table, as said of a link pointing at it."""
        if name in self.reference:
            return "reference data"
        if name in self.member_of:
            root = self.member_of[name].parent
            return f"itself a member of {_bare(root)} (a member is keyed by its root's id)"
        if name in self.roots:
            return "a root"
        return "not a root"

    def member_why(self, name: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
        chosen = self.member_of[name]
        notes, alternatives = [], []
        if chosen.nullable:
            notes.append(f"{chosen.column} is nullable: weaker evidence, a row may belong to no {_bare(chosen.parent)}")
        also = []
        for link in sorted(self.links_from[name], key=lambda k: (k.parent, k.column)):
            if link == chosen:
                continue
            if link.parent in self.roots:
                alternatives.append((link.parent, link.column))
                if link.parent == chosen.parent:
                    also.append(f"{link.shown}: the same root, {self._why_over(chosen, link)}")
                else:
                    also.append(f"{link.shown}, a root too: {self._why_over(chosen, link)}")
            elif link.parent in self.member_of and self.member_of[link.parent].parent == chosen.parent:
                also.append(f"{link.shown}: itself a member of {_bare(chosen.parent)}; {_bare(name)} holds the "
                            f"{_bare(chosen.parent)} id itself, so it goes under the same key as its "
                            f"{_bare(link.parent)}")
            else:
                also.append(f"{link.shown}: {self._where(link.parent)}")
        if also:
            notes.append("also references " + "; ".join(also))
        notes += self.associations.get(name, [])
        return ("; ".join(notes) or None), tuple(alternatives)

    def root_why(self, name: str) -> str:
        table, holders = self.tables[name], self.holders[name]
        parts = [f"{name}: its id is held by {len(holders)} table{'s' if len(holders) != 1 else ''}"
                 + (f", {_rows(table.rows)}" if table.rows is not None else "")]
        refs = [k.shown for k in sorted(self.links_from[name], key=lambda k: (k.parent, k.column))
                if k.parent in self.reference]
        if refs:
            parts.append(f"its own references {', '.join(refs)} are reference data")
        for link in sorted(self.links_from[name], key=lambda k: (k.parent, k.column)):
            if link.parent in self.reference:
                continue
            if link.parent in self.roots:
                why = (self._why_first(name, link.parent) if self._rank(name) < self._rank(link.parent)
                       else f"{link.column} is nullable, too weak to make an owner a member")
                parts.append(f"a root rather than a member of {_bare(link.parent)} through {link.column}: {why}")
            else:
                parts.append(f"it references {link.shown}, {self._where(link.parent)}")
        parts += self.associations.get(name, [])
        return "; ".join(parts)

    def standalone_note(self, name: str) -> str:
        if name in self.reference:
            why = f"reference data: {self.reference[name]}"
        elif name in self.roots:  # its holders all went to other roots
            went = []
            for holder in self.holders[name]:
                if holder in self.roots:
                    went.append(f"{holder} is a root itself")
                else:
                    link = next(k for k in self.links_from[holder] if k.parent == name)
                    went.append(f"{holder} joined {_bare(self.member_of[holder].parent)} "
                                f"({self._why_over(self.member_of[holder], link)})")
            why = "every table holding its id went elsewhere: " + "; ".join(went)
        elif self.holders[name]:
            why = f"every table holding its id ({', '.join(self.holders[name])}) is a root of its own"
        else:
            why = "no captured table holds its id"
        notes = [why, *(f"not a member: {e}" for e in _why_not_link(self.tables[name], self.tables)),
                 *self.associations.get(name, [])]
        return "; ".join(notes)

    def unjoinable_reason(self, name: str) -> str:
        def successors(t: str) -> list[str]:
            return sorted({k.parent for k in self.links_from[t] if k.parent not in self.reference})

        reached = _walk(successors, name)
        nearest = sorted((reached[r][0], self._rank(r), r) for r in self.roots if r in reached)
        if nearest:
            root = nearest[0][2]
            through = _path(reached, name, root)[1:-1]
            return (f"reaches {root} only through {' -> '.join(through)}; "
                    f"add a column holding the {_bare(root)} id")
        source = self.tables[name]
        pk = (f"no single-column primary key ({', '.join(source.primary_key)})" if source.primary_key
              else "no primary key")
        refs = sorted({k.parent for k in self.links_from[name]})
        if refs:
            return f"{pk}, so it cannot be a root; and it references only reference data ({', '.join(refs)})"
        why = _why_not_link(source, self.tables) + self.associations.get(name, [])
        fks = f"no ownership foreign key: {'; '.join(why)}" if why else "no foreign key to a captured table"
        return f"{pk}, so it cannot be a root; and {fks}"


def suggest(tables: Iterable[TableShape]) -> Suggestion:
    """Propose hierarchies over the given (captured) tables, each choice with its reason (module docstring)."""
    an = _Analysis(tables)
    members: dict[str, list[Member]] = {root: [] for root in an.roots}
    for name, link in sorted(an.member_of.items()):
        why, alternatives = an.member_why(name)
        members[link.parent].append(Member(name, link.column, alternatives, why, link.nullable))
    joined = sorted(root for root in an.roots if members[root])
    names = _hierarchy_names(joined)
    hierarchies = sorted((Hierarchy(names[r], r, tuple(members[r]), an.root_why(r)) for r in joined),
                         key=lambda h: h.name)
    standalone, unjoinable = [], []
    for name in sorted(an.tables):
        if name in joined or name in an.member_of:
            continue
        leads_on = any(k.parent not in an.reference for k in an.links_from[name])
        if name in an.reference or name in an.roots or (_single_pk(an.tables[name]) and not leads_on):
            standalone.append(Standalone(name, an.standalone_note(name), name in an.reference))
        else:
            unjoinable.append(Unjoinable(name, an.unjoinable_reason(name)))
    unestimated = tuple(sorted(n for n, t in an.tables.items() if t.rows is None))
    return Suggestion(tuple(hierarchies), tuple(standalone), tuple(unjoinable), unestimated)


# ---------------------------------------------------------------------------------------------------------------
# the YAML proposal


def _scalar(text: str) -> str:
    # Plain only when YAML reads it back as the same string (a column named `on` or `null` would not);
    # otherwise a JSON string, which is also a valid YAML double-quoted scalar (quotes, unicode, spaces).
    if _PLAIN_SCALAR_RE.match(text) and yaml.safe_load(text) == text:
        return text
    quoted = json.dumps(text, ensure_ascii=False)  # readable letters (Ärger), escaped control characters
    return "".join(c if c.isprintable() else (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
                   for c in quoted)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render_yaml(result: Suggestion) -> str:
    """The `hierarchies` section of a pipeline file; why each root and member, and what did not fit, in comments."""
    lines = ["hierarchies:" if result.hierarchies else "hierarchies: {}"]
    for h in result.hierarchies:
        lines.append(f"  {_scalar(h.name)}:")
        if h.why:
            lines.append(f"    # root {_one_line(h.why)}")
        lines += [f"    root: {_scalar(h.root)}", "    members:"]
        for m in h.members:
            line = f"      {_scalar(m.table)}: {_scalar(m.column)}"
            if m.why:
                line += f"  # {_one_line(m.why)}"
            lines.append(line)
    if result.standalone:
        tables = ", ".join(_one_line(s.table) for s in result.standalone)
        lines.append(f"# standalone (no member rows belong to them): {tables}")
        lines += [f"#   {_one_line(s.table)}: {_one_line(s.note)}" for s in result.standalone if s.note]
    if result.unjoinable:
        lines.append("# cannot join a hierarchy:")
        lines += [f"#   {_one_line(u.table)}: {_one_line(u.reason)}" for u in result.unjoinable]
    if result.unestimated:
        lines.append(f"# no row estimate for {len(result.unestimated)} table(s) (never analysed: run ANALYZE for "
                     "better evidence); their reference data was told from the foreign keys alone")
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
        engine = create_engine(source_url(url))
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigError(f"--url: not a usable SQLAlchemy URL ({exc})") from None
    return engine


def _with_connection(url: str, work: Callable[[Connection], list[TableShape]]) -> list[TableShape]:
    engine = _engine(url)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            return work(conn)
    except OperationalError as exc:
        raise ServiceUnavailable(f"source database {shown} did not answer: {_one_line(str(exc.orig))}") from exc
    except DBAPIError as exc:
        raise CdcError(f"reading the foreign keys of {shown} failed: {_one_line(str(exc.orig))}") from exc
    finally:
        engine.dispose()


def _graph(shapes: dict[str, TableShape]) -> list[TableShape]:
    # Schema by schema (sorted), in the order named within each: the order the analysis has always been given.
    return sorted(shapes.values(), key=lambda t: t.schema)


def reflect_source(url: str, tables: list[str]) -> list[TableShape]:
    """The graph model of the named source tables; ConfigError naming any that do not exist."""
    if not tables:
        raise ConfigError("--tables: name at least one schema-qualified table")
    for name in tables:
        _split(name)
    return _with_connection(url, lambda conn: _graph(
        reflect_tables(conn, tables, catalog=False, estimates=True, field_name="--tables")))


def reflect_all(url: str, schemas: list[str] | None = None) -> list[TableShape]:
    """The graph model of every table of the given schemas (default: every schema but the system's), read in one
    pass, so that foreign keys across schemas count."""

    def work(conn: Connection) -> list[TableShape]:
        present = [s for s in inspect(conn).get_schema_names()
                   if s != "information_schema" and not s.startswith("pg_")]
        if schemas:
            unknown = [s for s in dict.fromkeys(schemas) if s not in present]
            if unknown:
                raise ConfigError(f"--schema: no such schema at the source: {', '.join(unknown)}")
        chosen = list(dict.fromkeys(schemas)) if schemas else present
        tables = _graph(reflect_tables(conn, schemas=chosen, catalog=False, estimates=True))
        if not tables:
            raise ConfigError(f"--all: the source has no tables in schema(s) {', '.join(chosen)}")
        return tables

    return _with_connection(url, work)
