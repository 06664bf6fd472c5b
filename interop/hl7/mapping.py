"""The v2 -> FHIR mapping engine: applies the tables in `mappings/hl7v2/` to parsed segments.

Pure and generic: what maps where is data (segment, datatype, code-system and message maps
derived from the HL7 v2-to-FHIR IG, see the READMEs there); this module only knows how to read
a row. The few conversions the IG describes in words (DTM -> dateTime, HD -> system, PL ->
display, CWE text, XCN -> contained Practitioner) are the `FUNCTIONS` below, named from the
datatype files.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from .errors import ErrorCode
from .message import Component, MessageError, Repetition, Segment

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


class MappingTableError(ValueError):
    """A mapping file is malformed (names the file and the row)."""


# -- tables ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tables:
    segments: dict[str, dict[str, Any]]
    datatypes: dict[str, dict[str, Any]]
    codesystems: dict[str, dict[str, Any]]
    messages: dict[str, dict[str, Any]]

    def message_for(self, message_type: str) -> dict[str, Any] | None:
        for spec in self.messages.values():
            if message_type in spec.get("triggers", []):
                return spec
        return None


def _read_dir(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(path.glob("*.yaml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise MappingTableError(f"{f}: not a mapping")
        out[f.stem] = data
    return out


@lru_cache(maxsize=4)
def load_tables(path: Path) -> Tables:
    """Read and check every table under `path` (INTEROP_MAPPINGS_DIR/hl7v2)."""
    path = Path(path)
    tables = Tables(_read_dir(path / "segments"), {v["datatype"]: v for v in _read_dir(path / "datatypes").values()},
                    {v["name"]: v for v in _read_dir(path / "codesystems").values()}, _read_dir(path / "messages"))
    _check(tables)
    return tables


def _check(t: Tables) -> None:
    """Fail at load time, not on the first message that reaches a bad row."""
    def row_refs(where: str, row: dict[str, Any]) -> None:
        if row.get("datatype") and row["datatype"] not in t.datatypes:
            raise MappingTableError(f"{where}: unknown datatype {row['datatype']}")
        if row.get("vocabulary") and row["vocabulary"] not in t.codesystems:
            raise MappingTableError(f"{where}: unknown vocabulary {row['vocabulary']}")
        if row.get("condition"):
            try:
                _parse_condition(row["condition"])
            except ValueError as exc:
                raise MappingTableError(f"{where}: {exc}") from None

    for name, seg in t.segments.items():
        for i, row in enumerate(seg.get("rows", []), start=1):
            if not FIELD_REF.match(str(row.get("field", ""))):
                raise MappingTableError(f"segments/{name} row {i}: field must be SEG-n or SEG-n.c")
            if "ig_row" not in row:
                raise MappingTableError(f"segments/{name} row {i}: every row cites its IG row (ig_row, null for the hub's)")
            row_refs(f"segments/{name} row {i}", row)
    for name, dt in t.datatypes.items():
        if dt.get("function") and dt["function"] not in FUNCTIONS:
            raise MappingTableError(f"datatypes/{name}: unknown function {dt['function']}")
        if dt.get("post") and dt["post"] not in FUNCTIONS:
            raise MappingTableError(f"datatypes/{name}: unknown post {dt['post']}")
        for key in ("equipment", "use"):  # the vocabularies a function reads (XTN)
            if dt.get(key) and dt[key] not in t.codesystems:
                raise MappingTableError(f"datatypes/{name}: unknown vocabulary {dt[key]}")
        for i, row in enumerate(dt.get("components", []), start=1):
            row_refs(f"datatypes/{name} row {i}", row)
    for name, msg in t.messages.items():
        maps = [m for part in ("patient", "encounter", "merge") for m in (msg.get(part) or {}).get("maps", [])]
        maps += [m for spec in ((msg.get("order") or {}).get("segments") or {}).values() for m in spec["maps"]]
        for m in maps:
            if m not in t.segments:
                raise MappingTableError(f"messages/{name}: unknown segment map {m}")


# -- conditions (the IG's words) ---------------------------------------------------------------
FIELD_REF = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d+)(?:\.(\d+))?$")
DT_REF = re.compile(r"^([A-Z]{2,3})\.(\d+)$")
_CLAUSES = [
    (re.compile(r"^(\S+) NOT VALUED$"), "not_valued"),
    (re.compile(r"^(\S+) (?:IS )?VALUED$"), "valued"),
    (re.compile(r'^(\S+) NOT EQUALS "(.*)"$'), "not_equals"),
    (re.compile(r'^(\S+) EQUALS "(.*)"$'), "equals"),
    (re.compile(r"^(\S+) IN \((.*)\)$"), "in"),
    (re.compile(r"^(\S+) LENGTH GREATER THAN (\d+)$"), "longer"),
]


@lru_cache(maxsize=512)
def _parse_condition(text: str) -> tuple[tuple[str, str, str], ...]:
    clauses = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        for pattern, op in _CLAUSES:
            m = pattern.match(part.strip())
            if m:
                ref = m.group(1)
                if not (FIELD_REF.match(ref) or DT_REF.match(ref)):
                    raise ValueError(f"condition {text!r}: {ref!r} is not a field or component reference")
                clauses.append((op, ref, m.group(2) if m.lastindex and m.lastindex > 1 else ""))
                break
        else:
            raise ValueError(f"condition {text!r}: clause {part!r} not understood")
    return tuple(clauses)


def _holds(text: str | None, resolve: Callable[[str], tuple[bool, str]]) -> bool:
    if not text:
        return True
    for op, ref, arg in _parse_condition(text):
        valued, value = resolve(ref)
        if op == "not_valued":
            ok = not valued
        elif op == "valued":
            ok = valued
        elif op == "equals":
            ok = value == arg
        elif op == "not_equals":
            ok = value != arg
        elif op == "in":
            ok = value in [a.strip().strip('"') for a in arg.split(",")]
        else:
            ok = len(value) > int(arg)
        if not ok:
            return False
    return True


# -- context -----------------------------------------------------------------------------------
@dataclass
class Context:
    """What one resource's rows can see: the segments in scope (the order group, PID, MSH)."""

    tables: Tables
    segments: dict[str, Segment]
    default_namespace: str = ""
    # segments that repeat in the group (NTE, DG1): their maps run once per occurrence
    repeats: dict[str, list[Segment]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    contained: list[dict[str, Any]] = field(default_factory=list)
    location: tuple[str, int | None, int] = ("MSH", None, 1)

    def error(self, reason: str, code: ErrorCode = ErrorCode.DATA_TYPE) -> MessageError:
        seg, fld, seq = self.location
        return MessageError(reason, seg, fld, seq, code)

    def resolve(self, ref: str) -> tuple[bool, str]:
        m = FIELD_REF.match(ref)
        if not m:
            raise MappingTableError(f"{ref}: a segment row's condition must name SEG-n or SEG-n.c")
        seg = self.segments.get(m.group(1))
        if seg is None:
            return False, ""
        n, c = int(m.group(2)), int(m.group(3) or 0)
        if c:
            return seg.valued(n, c), seg.value(n, c)
        return seg.valued(n), seg.value(n)


# -- paths ---------------------------------------------------------------------------------------
# `a.b`, `a[0]`, `a[]` (append), and `extension{url}`: the element of the list whose `url` is
# this one, added when absent (FHIR's way of naming an extension; dots inside braces do not split).
_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(-1|\d*)\]|\{([^{}]+)\})?$")
_SPLIT = re.compile(r"\.(?![^{]*\})")


def _by_url(lst: list[Any], url: str) -> dict[str, Any]:
    for item in lst:
        if isinstance(item, dict) and item.get("url") == url:
            return item
    element: dict[str, Any] = {"url": url}
    lst.append(element)
    return element


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Deep merge; what is already there wins, lists grow."""
    for k, v in new.items():
        if k not in into or into[k] in (None, "", [], {}):
            into[k] = copy.deepcopy(v)
        elif isinstance(into[k], dict) and isinstance(v, dict):
            _merge(into[k], v)
        elif isinstance(into[k], list) and isinstance(v, list):
            into[k].extend(copy.deepcopy(v))


def set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at `path` (`a.b`, `a[0].b`, `a[]` appends); a single value already set wins."""
    if path == ".":
        if isinstance(value, dict):
            _merge(obj, value)
        return
    tokens = _SPLIT.split(path)
    cur: Any = obj
    for i, tok in enumerate(tokens):
        m = _TOKEN.match(tok)
        if not m:
            raise MappingTableError(f"bad target path {path!r}")
        key, index, url = m.group(1), m.group(2), m.group(3)
        last = i == len(tokens) - 1
        if url is not None:
            element = _by_url(cur.setdefault(key, []), url)
            if last:
                if isinstance(value, dict):
                    _merge(element, value)
                return
            cur = element
            continue
        if index is None:
            if last:
                if key not in cur or cur[key] in (None, "", [], {}):
                    cur[key] = value
                elif isinstance(cur[key], dict) and isinstance(value, dict):
                    _merge(cur[key], value)
                return
            cur = cur.setdefault(key, {})
            continue
        lst = cur.setdefault(key, [])
        if index == "":
            if last:
                lst.append(value)
                return
            lst.append({})
            cur = lst[-1]
            continue
        n = int(index)
        if n == -1:  # the last element, as an earlier row of the same segment made it
            n = max(len(lst) - 1, 0)
        while len(lst) <= n:
            lst.append({})
        if last:
            if lst[n] in ({}, None, ""):
                lst[n] = value
            elif isinstance(lst[n], dict) and isinstance(value, dict):
                _merge(lst[n], value)
            return
        cur = lst[n]


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == [] or v == {}


# -- vocabularies --------------------------------------------------------------------------------
def translate(tables: Tables, name: str, code: str, as_coding: bool = False) -> Any:
    """A v2 code through a code-system map: the FHIR code (or Coding), or None when unmapped."""
    cs = tables.codesystems[name]
    code = code.strip()
    if not code or code == '""':
        return None
    mapping = cs.get("map") or {}
    entry = mapping.get(code) or mapping.get(code.upper())
    if entry is None:
        how = cs.get("unmapped")
        if how == "keep":
            return {"system": cs["keep_system"], "code": code} if as_coding else code
        if how == "local":
            return coding_system(code)
        return None
    if not as_coding:
        return entry["code"]
    out = {"system": cs["target_system"], "code": entry["code"]}
    if entry.get("display"):
        out["display"] = entry["display"]
    return out


def coding_system(name: str) -> str:
    """Table 0396 names the map does not list: HL7nnnn -> the v2 table's URI, else a hub URN."""
    m = re.fullmatch(r"HL7(\d{4})", name.upper())
    if m:
        return f"http://terminology.hl7.org/CodeSystem/v2-{m.group(1)}"
    return f"urn:interop-hub:codesystem:{quote(name, safe='-._~')}"


# -- datatype functions --------------------------------------------------------------------------
DTM_RE = re.compile(r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:T?(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,4})?)?)?)?)?)?([+-]\d{4})?$")


def _dtm_parts(text: str, ctx: Context) -> re.Match[str]:
    m = DTM_RE.match(text.strip())
    if not m:
        raise ctx.error("not a valid HL7 date/time (DTM)")
    y, mo, d, hh, mi, ss = (m.group(i) for i in range(1, 7))
    try:
        if mo and not 1 <= int(mo) <= 12 or d and not 1 <= int(d) <= 31 or hh and int(hh) > 23 \
                or mi and int(mi) > 59 or ss and int(ss) > 60:
            raise ValueError
    except ValueError:
        raise ctx.error("not a valid HL7 date/time (DTM)") from None
    return m


def fn_datetime(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> str | None:
    text = rep.component(1)
    if not text:
        return None
    m = _dtm_parts(text, ctx)
    y, mo, d, hh, mi, ss, frac, tz = (m.group(i) for i in range(1, 9))
    out = y + (f"-{mo}" if mo else "") + (f"-{d}" if mo and d else "")
    if hh and d:
        zone = f"{tz[:3]}:{tz[3:]}" if tz else dt.get("default_timezone", "+07:00")
        out += f"T{hh}:{mi or '00'}:{ss or '00'}{frac or ''}{zone}"
    return out


def fn_date(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> str | None:
    text = rep.component(1)
    if not text:
        return None
    m = _dtm_parts(text, ctx)
    y, mo, d = m.group(1), m.group(2), m.group(3)
    return y + (f"-{mo}" if mo else "") + (f"-{d}" if mo and d else "")


OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")


def fn_hd(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> dict[str, Any] | None:
    ns, uid, typ = rep.component(1), rep.component(2), rep.component(3).upper()
    out: dict[str, Any] = {}
    if uid and typ == "ISO" and OID.match(uid):
        out["system"] = f"urn:oid:{uid}"
    elif uid and typ in ("URI", "URL"):
        out["system"] = uid
    elif uid and typ == "UUID":
        out["system"] = f"urn:uuid:{uid.lower()}"
    elif ns or uid or ctx.default_namespace:
        out["system"] = f"urn:interop-hub:{kind or 'id'}:{quote(ns or uid or ctx.default_namespace, safe='-._~')}"
    if ns:
        out["assigner"] = {"display": ns}
    return out or None


def fn_text(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> str | None:
    return str(rep.comp(1)) or None


def fn_pl_display(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> dict[str, Any] | None:
    parts = [rep.component(i) for i in (1, 2, 3, 4, 7, 8, 9)]
    text = ", ".join(p for p in parts if p)
    return {"display": text} if text else None


def post_cwe(result: dict[str, Any], ctx: Context, dt: dict[str, Any]) -> dict[str, Any] | None:
    codings = []
    for c in result.get("coding", []):
        if c.get("code"):
            codings.append(c)
        elif c.get("display") and not result.get("text"):
            result["text"] = c["display"]
    if codings:
        result["coding"] = codings
    else:
        result.pop("coding", None)
    return result or None


def post_practitioner_reference(result: dict[str, Any], ctx: Context, dt: dict[str, Any]) -> dict[str, Any] | None:
    idents = [i for i in result.get("identifier", []) if i.get("value")]
    names = [n for n in result.get("name", []) if n]
    if not idents and not names:
        return None
    practitioner: dict[str, Any] = {"resourceType": "Practitioner", "id": f"pr{len(ctx.contained) + 1}"}
    if idents:
        practitioner["identifier"] = idents
    if names:
        practitioner["name"] = names
    ctx.contained.append(practitioner)
    ref: dict[str, Any] = {"reference": f"#{practitioner['id']}", "type": "Practitioner"}
    if names:
        n = names[0]
        display = " ".join(n.get("prefix", []) + n.get("given", []) + ([n["family"]] if n.get("family") else []))
        if display:
            ref["display"] = display
    return ref


def fn_sad_line(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> str | None:
    """SAD (XAD.1): the street or mailing address (SAD.1) as sent; without it, the dwelling number
    and the street name (SAD.3, SAD.2), so "&Le Loi&12" is the line "12 Le Loi", not nothing."""
    line = rep.component(1)
    if line:
        return line
    text = " ".join(p for p in (rep.component(3), rep.component(2)) if p)
    return text or None


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")


def fn_xtn(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> dict[str, Any] | None:
    """XTN -> ContactPoint with the `system` R4 requires beside a value (invariant cnt-1).

    value: the e-mail address (XTN.4) for Internet/X.400 equipment or NET use, else the
    unformatted number (XTN.12), the v2.3-v2.6 formatted number (XTN.1), or the number from its
    parts (+country area local, ext. extension: XTN.5-8). system: XTN.3 through the equipment
    table; without XTN.3, NET is email, BPN pager, an address with an @ email, else phone; an
    equipment code the table does not know is `other` (never no system). use: XTN.2 through the
    use table, a cellular phone (CP) with no use given is mobile."""
    use_code, equipment = rep.component(2), rep.component(3)
    email = equipment in ("Internet", "X.400") or use_code == "NET"
    value = rep.component(4) if email else ""
    if not value:
        value = rep.component(12) or rep.component(1)
    if not value and any(rep.component(i) for i in (5, 6, 7)):
        value = " ".join(p for p in (f"+{rep.component(5)}" if rep.component(5) else "", rep.component(6),
                                     rep.component(7)) if p)
        if rep.component(8):
            value += f" ext. {rep.component(8)}"
    if not value and rep.component(4):
        value, email = rep.component(4), True
    if not value:
        return None
    out: dict[str, Any] = {"value": value}
    if equipment:
        out["system"] = translate(ctx.tables, dt["equipment"], equipment) or "other"
    elif email or _EMAIL.match(value):
        out["system"] = "email"
    elif use_code == "BPN":
        out["system"] = "pager"
    else:
        out["system"] = "phone"
    use = translate(ctx.tables, dt["use"], use_code) if use_code else None
    if use is None and equipment == "CP":
        use = "mobile"
    if use:
        out["use"] = use
    return out


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def fn_decimal(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> int | float | None:
    """NM -> a JSON number (FHIR decimal/integer); not a number: HL7 error 102."""
    text = rep.component(1).strip()
    if not text:
        return None
    if not _NUMBER.match(text):
        raise ctx.error("not a valid HL7 number (NM)")
    number = float(text)
    if dt.get("integer") or (number.is_integer() and "." not in text):
        if not number.is_integer():
            raise ctx.error("not a whole number")
        return int(number)
    return number


def fn_boolean(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> bool | None:
    """ID with table 0136 (Yes/No indicator): Y -> true, N -> false, anything else: no value."""
    return {"Y": True, "N": False}.get(rep.component(1).strip().upper())


_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?$")


def fn_time(rep: Repetition, ctx: Context, dt: dict[str, Any], kind: str | None) -> str | None:
    """TM (HH[MM[SS]]) -> FHIR time (hh:mm:ss)."""
    text = rep.component(1).strip()
    if not text:
        return None
    m = _TM.match(text)
    if not m or int(m.group(1)) > 23 or int(m.group(2) or 0) > 59 or int(m.group(3) or 0) > 59:
        raise ctx.error("not a valid HL7 time (TM)")
    return f"{m.group(1)}:{m.group(2) or '00'}:{m.group(3) or '00'}"


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "datetime": fn_datetime, "date": fn_date, "hd": fn_hd, "text": fn_text, "pl_display": fn_pl_display,
    "cwe": post_cwe, "practitioner_reference": post_practitioner_reference, "sad_line": fn_sad_line,
    "xtn": fn_xtn, "decimal": fn_decimal, "boolean": fn_boolean, "time": fn_time,
}


# -- applying rows -------------------------------------------------------------------------------
def _nested(comp: Component, sub: int | None) -> Repetition:
    if sub:
        return Repetition((Component((comp.sub(sub),)),))
    return Repetition(tuple(Component((s,)) for s in comp.subs))


def apply_datatype(name: str, rep: Repetition, ctx: Context, kind: str | None = None) -> Any:
    """One repetition through a datatype map (`datatypes/<name>.yaml`)."""
    dt = ctx.tables.datatypes[name]
    if dt.get("function"):
        return FUNCTIONS[dt["function"]](rep, ctx, dt, kind)
    result: dict[str, Any] = {}
    scalar: Any = None
    sourced = False

    def resolve(ref: str) -> tuple[bool, str]:
        m = DT_REF.match(ref)
        if not m or m.group(1) != name:
            raise MappingTableError(f"datatypes/{name}: condition must name {name}.n, not {ref}")
        v = rep.component(int(m.group(2)))
        return bool(v), v

    for row in dt.get("components", []):
        if not _holds(row.get("condition"), resolve):
            continue
        if "components" in row:
            part = Repetition(tuple(rep.comp(i) for i in row["components"]))
        elif "c" in row:
            part = _nested(rep.comp(row["c"]), row.get("sub"))
        else:
            part = None
        valued = part is None or part.valued
        if not valued and not row.get("always"):
            continue
        if "value" in row:
            value: Any = row["value"]
        elif row.get("datatype"):
            value = apply_datatype(row["datatype"], part or Repetition(()), ctx, row.get("system_kind") or kind)
        elif row.get("vocabulary"):
            value = translate(ctx.tables, row["vocabulary"], part.component(1) if part else "", row.get("as") == "coding")
        else:
            value = (part.component(1) if row.get("sub") else "&".join(str(c) for c in part)) if part else None
        if _empty(value):
            continue
        if part is not None and valued:
            sourced = True
        if row["target"] == "." and not isinstance(value, dict):
            scalar = scalar if scalar is not None else value
        else:
            set_path(result, row["target"], value)
    if not sourced:
        return None
    if scalar is not None:
        return scalar
    if dt.get("required") and _empty(result.get(dt["required"])):
        return None
    if dt.get("post"):
        return FUNCTIONS[dt["post"]](result, ctx, dt)
    return result or None


def _explicit_null(seg: Segment, n: int) -> bool:
    """The field is `""`: HL7's "delete the value the receiver holds" (v2.5 ch. 2.5.3)."""
    reps = seg.fields[n - 1] if 0 < n <= len(seg.fields) else ()
    return len(reps) == 1 and len(reps[0]) == 1 and reps[0][0].subs == ('""',)


def _cleared(ctx: Context, target: str) -> None:
    """Record the top-level element a `""` field empties (fact `cleared`), for an update to remove.
    Extensions and primitive extensions (`_x`) hold other fields' values too: never cleared whole."""
    key = _TOKEN.match(_SPLIT.split(target)[0])
    if key and not key.group(3) and key.group(1) != "extension" and not key.group(1).startswith("_"):
        cleared = ctx.facts.setdefault("cleared", [])
        if key.group(1) not in cleared:
            cleared.append(key.group(1))


def apply_segment_map(map_name: str, resource: dict[str, Any], ctx: Context) -> None:
    """Apply one segment map's rows (segments/<map_name>.yaml) to `resource`, recording facts."""
    spec = ctx.tables.segments[map_name]
    for row in spec.get("rows", []):
        m = FIELD_REF.match(row["field"])
        assert m is not None  # checked at load
        seg = ctx.segments.get(m.group(1))
        if seg is None or not _holds(row.get("condition"), ctx.resolve):
            continue
        n, c = int(m.group(2)), int(m.group(3) or 0)
        if not c and row.get("target") and _explicit_null(seg, n):
            _cleared(ctx, row["target"])
            continue
        reps = seg.get(n)
        if c:
            reps = [Repetition((r.comp(c),)) for r in reps if r.component(c)]
        if row.get("repeat") == "join" and reps:  # repetitions as the lines of one value (NTE-3)
            reps = [Repetition((Component(("\n".join(r.component(1) for r in reps),)),))]
        if not reps and not row.get("always"):
            continue
        if row.get("fact"):
            texts = [r.component(1) for r in reps]
            if row.get("repeat") == "all":
                ctx.facts.setdefault(row["fact"], texts)
            elif texts:
                ctx.facts.setdefault(row["fact"], texts[0])
        if not row.get("target"):
            continue
        ctx.location = (seg.id, n, seg.sequence)
        for rep in (reps if row.get("repeat") == "all" else reps[:1]) or [Repetition(())]:
            value: Any
            if "value" in row:
                value = row["value"]
            elif row.get("datatype"):
                value = apply_datatype(row["datatype"], rep, ctx, row.get("system_kind"))
            elif row.get("vocabulary"):
                value = translate(ctx.tables, row["vocabulary"], rep.component(1), row.get("as") == "coding")
            else:
                value = rep.component(1) or None
            if _empty(value):
                continue
            if row.get("prefix") and isinstance(value, str):
                value = row["prefix"] + value
            if row.get("wrap"):
                wrapped: dict[str, Any] = {}
                set_path(wrapped, row["wrap"], value)
                value = wrapped
            if row.get("assign") and isinstance(value, dict):
                for path, constant in row["assign"].items():
                    set_path(value, path, copy.deepcopy(constant))
            set_path(resource, row["target"], value)


def build_resource(resource_type: str, maps: list[str], ctx: Context, message_spec: dict[str, Any]) -> dict[str, Any]:
    """A FHIR resource (dict) from the segment maps, then the message map's constants."""
    resource: dict[str, Any] = {"resourceType": resource_type}
    ctx.contained = []
    for name in maps:
        spec = ctx.tables.segments[name]
        if spec["resource"] != resource_type:
            continue
        seg_id = spec["segment"]
        occurrences = ctx.repeats.get(seg_id)
        if not occurrences:
            apply_segment_map(name, resource, ctx)
            continue
        first = ctx.segments.get(seg_id)
        for seg in occurrences:
            ctx.segments[seg_id] = seg
            apply_segment_map(name, resource, ctx)
        if first is not None:
            ctx.segments[seg_id] = first
    conf = (message_spec.get("resources") or {}).get(resource_type) or {}
    for k, v in (conf.get("fixed") or {}).items():
        resource[k] = copy.deepcopy(v)
    for k, v in (conf.get("default") or {}).items():
        if _empty(resource.get(k)):
            resource[k] = copy.deepcopy(v)
    for k in conf.get("placeholders") or []:
        resource.setdefault(k, None)
    if ctx.contained:
        resource["contained"] = ctx.contained
    return resource
