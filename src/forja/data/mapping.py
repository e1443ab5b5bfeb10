"""Which column is which: `--map question=Consulta,answer=Contestación` and `--guess`, for tables whose
columns are no known format (forja.data detects those by name).

`forja data inspect faq.csv --guess` proposes a mapping from the columns' names and values and says it;
`forja data prepare faq.csv --map ... --out t.jsonl` reads the file by it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forja.data import (
    DIALOGUE, KNOWLEDGE, BadRow, DataError, Format, ReadOptions, _Bad, _Record, _Row, _Table, _as_text, _check_turns,
    _clean, _detect, _filled, _fold, _keys, _required, _turns,
)

# What --map may name: the fields of a single-turn row (question, answer, optional system and context), of
# a knowledge row (text), and of multi-turn rows (conversation, role, content: either one column holding a
# list of turns with role/content keys, or one row per turn grouped by the conversation column).
MAP_FIELDS = ("question", "answer", "system", "context", "text", "conversation", "role", "content")
# Words in column names that --guess takes as a hint (accents folded, names split at non-letters).
QUESTION_WORDS = {
    "question", "pregunta", "consulta", "query", "prompt", "input", "user", "usuario", "cliente", "customer",
    "client", "instruction", "ask", "q", "mensaje", "message", "human", "peticion", "duda", "entrada",
}
ANSWER_WORDS = {
    "answer", "respuesta", "contestacion", "reply", "response", "output", "bot", "assistant", "asistente",
    "agent", "agente", "a", "completion", "solucion", "gpt", "target", "salida", "replica",
}
SYSTEM_WORDS = {"system", "sistema", "instrucciones"}
CONTEXT_WORDS = {"context", "contexto"}
CONVERSATION_WORDS = {"conversation", "conversacion", "dialog", "dialogue", "dialogo", "chat", "session",
                      "sesion", "thread", "hilo", "id", "ticket", "caso"}
ROLE_WORDS = {"role", "rol", "speaker", "from", "author", "autor", "quien", "who", "sender", "emisor"}
# Role values in one-row-per-turn tables, folded to lower case without accents.
TURN_ROLES = {
    "system": "system", "sistema": "system",
    "user": "user", "usuario": "user", "human": "user", "cliente": "user", "customer": "user", "client": "user",
    "assistant": "assistant", "asistente": "assistant", "gpt": "assistant", "bot": "assistant",
    "agent": "assistant", "agente": "assistant", "model": "assistant", "modelo": "assistant",
}
GUESS_SAMPLE_ROWS = 200  # --guess looks at the values of this many rows


def parse_map(text: str) -> dict[str, str]:
    """`question=Consulta,answer=Contestación` → {"question": "Consulta", "answer": "Contestación"}."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, equals, column = part.partition("=")
        name = name.strip().lower()
        if not equals or not column.strip():
            raise DataError(f'--map "{part}": write FIELD=COLUMN, e.g. --map question=Consulta,answer=Contestación')
        if name not in MAP_FIELDS:
            raise DataError(f'--map "{part}": unknown field "{name}"; fields are {", ".join(MAP_FIELDS)}')
        mapping[name] = column.strip()
    check_map(mapping)
    return mapping


def check_map(mapping: dict[str, str]) -> None:
    fields = set(mapping)
    if not fields:
        return
    unknown = fields - set(MAP_FIELDS)
    if unknown:
        raise DataError(f'map: unknown field "{sorted(unknown)[0]}"; fields are {", ".join(MAP_FIELDS)}')
    single, multi = {"question", "answer", "system", "context"} & fields, {"conversation", "role", "content"} & fields
    if sum(map(bool, (single, multi, "text" in fields))) > 1:
        raise DataError(f"map {map_text(mapping)}: map either question/answer (with system, context), or text, "
                        "or conversation/role/content, not several of them")
    if single and not {"question", "answer"} <= fields:
        raise DataError(f"map {map_text(mapping)}: map both question and answer")
    if multi and "conversation" not in fields:
        raise DataError(f"map {map_text(mapping)}: map conversation too (the column of turns, or of conversation ids)")


def map_text(mapping: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in mapping.items())


CONVERSATION_ROWS = Format("conversation", DIALOGUE, ("conversation", "role", "content"))  # only by a mapping


def mapped_format(mapping: dict[str, str]) -> Format:
    if "conversation" in mapping:
        return CONVERSATION_ROWS
    if "text" in mapping:
        return Format("text", KNOWLEDGE, ("text",))
    return Format("question/answer", DIALOGUE, ("question", "answer"))


def resolve_map(
    path: Path, table: _Table, mapping: dict[str, str], word: str
) -> tuple[_Table, dict[str, str]] | None:
    """The table with its mapped columns renamed to the fields (other columns dropped), and each field's
    column name for messages; None where the columns are missing but the file has a known format itself."""
    keys = [k for k in _keys(table) if k]
    folded = {}
    for key in keys:
        folded.setdefault(_fold(key), key)
    columns: dict[str, str] = {}
    inner = {}  # conversation turns as lists: role= and content= name keys inside each turn
    for name, column in sorted(mapping.items(), key=lambda item: item[0] != "conversation"):  # conversation first
        wanted = column.strip().lower()
        found = wanted if wanted in keys else folded.get(_fold(wanted))
        if found is None and name in ("role", "content") and _holds_lists(table, columns.get("conversation")):
            inner[name] = column  # a key inside each turn, see turn_rows
            continue
        if found is None:
            try:
                _detect(path, table, word)
                return None
            except DataError:
                pass
            close = difflib.get_close_matches(wanted, keys, n=1, cutoff=0.5)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise DataError(
                f'{path}: --map {name}={column}: no {word} "{column}"{hint}; the {word}s are {", ".join(keys) or "none"}'
            )
        columns[name] = found
    rows: list[_Row | BadRow] = []
    for row in table.rows:
        if isinstance(row, _Row):
            values = {name: row.values[column] for name, column in columns.items() if column in row.values}
            values.update({f"{name} key": column for name, column in inner.items()})
            row = _Row(row.label, row.ref, values)
        rows.append(row)
    renamed = _Table(list(columns) if table.columns is not None else None, rows, table.detail)
    return renamed, {name: f'{word} "{column}"' for name, column in columns.items()}


def _holds_lists(table: _Table, column: str | None) -> bool:
    first = next((r.values[column] for r in table.rows if isinstance(r, _Row) and _filled(r.values.get(column))), None)
    return isinstance(first, list) or (isinstance(first, str) and first.lstrip().startswith("["))


def turn_roles(options: ReadOptions | None) -> Callable[[Any], str | None]:
    """A turn's role from its role value: the usual names in English and Spanish, or, with --assistant,
    that name for the assistant and any other but "system" for the user."""
    assistant = _fold(options.assistant) if options and options.assistant else None

    def role(value: Any) -> str | None:
        name = _fold(str(value or "").strip())
        if assistant is not None:
            return "assistant" if name == assistant else "system" if TURN_ROLES.get(name) == "system" else "user"
        return TURN_ROLES.get(name)

    return role


def turn_rows(
    path: Path, table: _Table, names: dict[str, str], word: str, options: ReadOptions
) -> tuple[list[_Record], list[BadRow]]:
    """Mapped multi-turn rows: one column of conversation ids (a list of turns in it reads as one row each)."""
    rows = [row for row in table.rows if isinstance(row, _Row)]
    if _holds_lists(table, "conversation"):
        records, bad = [], [row for row in table.rows if isinstance(row, BadRow)]
        for row in rows:
            # Keys inside the turns: role= and content= as mapped (whatever their case), else role and content.
            role_key, content_key = row.values.get("role key", "role"), row.values.get("content key", "content")
            column = names["conversation"].split('"')[1]
            try:
                messages = _turns(row.values.get("conversation"), column, role_key, content_key, turn_roles(options),
                                  fold_keys=True)
                records.append(_Record(f"{path}:{row.ref}", messages=messages))
            except _Bad as problem:
                bad.append(BadRow(f"{path} {row.label}: {problem}", problem.empty))
        return records, bad
    for field_name in ("role", "content"):
        if field_name not in names:
            raise DataError(
                f"{path}: with one {word} of conversation ids, map the {word}s of each turn's role and text too "
                f"(--map conversation=..,role=..,content=..)"
            )
    bad = [row for row in table.rows if isinstance(row, BadRow)]
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        key = _clean(_as_text(row.values.get("conversation"), names["conversation"]))
        if not key:
            bad.append(BadRow(f'{path} {row.label}: {names["conversation"]} is empty', empty=True))
            continue
        groups.setdefault(key, []).append(row)
    role_of = turn_roles(options)
    records = []
    for key, turns in groups.items():
        messages: list[dict[str, str]] = []
        labels: list[str] = []
        try:
            for row in turns:
                role = role_of(row.values.get("role"))
                if role is None:
                    found = _as_text(row.values.get("role"), names["role"])
                    raise _Bad(f'{row.label}: {names["role"]} is "{found}", expected user, assistant or system '
                               f"(or name the assistant with --assistant)")
                try:
                    text = _required(row.values, "content", word, names)
                except _Bad as problem:
                    raise _Bad(f"{row.label}: {problem}", problem.empty) from None
                if messages and messages[-1]["role"] == role:  # one side speaking twice: one turn
                    messages[-1]["content"] += "\n" + text
                    continue
                messages.append({"role": role, "content": text})
                labels.append(row.label)
            _check_turns(messages, labels, f'{turns[0].label}: conversation "{key}"')
        except _Bad as problem:
            bad.append(BadRow(f"{path} {problem}", problem.empty))
            continue
        records.append(_Record(f"{path}:{turns[0].ref}", messages=messages))
    return records, bad


def _turn_keys(rows: list[_Row], key: str) -> dict[str, str]:
    """role= and content= for lists of turns whose keys are not "role" and "content": the key whose values
    are roles, and the one with the longest text."""
    turns = []
    for row in rows:
        value = row.values.get(key)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                continue
        turns += [t for t in value if isinstance(t, dict)] if isinstance(value, list) else []
    keys = list(dict.fromkeys(str(k) for turn in turns for k in turn))
    if not turns or {"role", "content"} <= set(keys):
        return {}
    values = {k: [str(t.get(k, "")) for t in turns] for k in keys}
    role = next((k for k in keys if {_fold(v) for v in values[k]} <= set(TURN_ROLES)), None)
    rest = [k for k in keys if k != role]
    if role is None or not rest:
        return {}
    content = max(rest, key=lambda k: sum(map(len, values[k])))
    return {"role": role, "content": content}


def guess(path: Path, table: _Table, word: str) -> tuple[dict[str, str], str]:
    """A mapping read from the columns' names and values, and why; DataError when none fits."""
    rows = [row for row in table.rows if isinstance(row, _Row)][:GUESS_SAMPLE_ROWS]
    keys = [k for k in _keys(table) if k]
    stats = {}
    for key in keys:
        values = [row.values.get(key) for row in rows]
        lists = sum(isinstance(v, list) or (isinstance(v, str) and v.lstrip().startswith("[{")) for v in values)
        texts = [str(v).strip() for v in values if _filled(v) and not isinstance(v, (list, dict))]
        stats[key] = {
            "words": set(re.split(r"[^a-z0-9]+", _fold(key))),
            "lists": lists / max(len(rows), 1),
            "filled": len(texts) / max(len(rows), 1),
            "numeric": sum(bool(re.fullmatch(r"[\d\s.,:/+-]+", t)) for t in texts) / max(len(texts), 1),
            "asks": sum(t.endswith("?") or t.startswith("¿") for t in texts),
            "count": len(texts),
            "length": sum(map(len, texts)) / max(len(texts), 1),
            "distinct": {_fold(t) for t in texts},
        }
    found = ", ".join(keys) or "none"

    def named(key: str, words: set[str]) -> bool:
        return bool(stats[key]["words"] & words)

    listed = [k for k in keys if stats[k]["lists"] > 0.5]
    if listed:
        key = max(listed, key=lambda k: stats[k]["lists"])
        return {"conversation": key, **_turn_keys(rows, key)}, f'{word} "{key}" holds lists of turns'
    text = [k for k in keys if stats[k]["filled"] >= 0.5 and stats[k]["numeric"] < 0.5]
    roles = [k for k in text if stats[k]["distinct"] and stats[k]["distinct"] <= set(TURN_ROLES)
             and len(stats[k]["distinct"]) >= 2]
    if roles:
        role = roles[0]
        rest = [k for k in keys if k != role and stats[k]["filled"] >= 0.5]
        ids = [k for k in rest if len(stats[k]["distinct"]) < stats[k]["count"]]
        ids.sort(key=lambda k: (not named(k, CONVERSATION_WORDS), stats[k]["length"]))
        contents = [k for k in text if k != role and k not in ids[:1]]
        if ids and contents:
            content = max(contents, key=lambda k: stats[k]["length"])
            return (
                {"conversation": ids[0], "role": role, "content": content},
                f'{word} "{role}" holds roles, "{ids[0]}" repeats (conversation ids), "{content}" is the longest text',
            )
    if len(text) < 2:
        if len(text) == 1:
            return {"text": text[0]}, f'{word} "{text[0]}" is the only one holding text'
        raise DataError(f"{path}: cannot guess which {word} is which ({word}s: {found}); name them with "
                        f"--map question={word.upper()},answer={word.upper()}")

    def ask_score(k: str) -> tuple:
        st = stats[k]
        return (2 * named(k, QUESTION_WORDS) - 2 * named(k, ANSWER_WORDS) + 1.5 * st["asks"] / max(st["count"], 1),
                -st["length"])

    plain = [k for k in text if not named(k, SYSTEM_WORDS | CONTEXT_WORDS)] or text
    if len(plain) < 2:
        plain = text
    question = max(plain, key=ask_score)
    others = [k for k in plain if k != question]
    answer = max(others, key=lambda k: (2 * named(k, ANSWER_WORDS) - 2 * named(k, QUESTION_WORDS)
                                        - stats[k]["asks"] / max(stats[k]["count"], 1), stats[k]["length"]))
    mapping = {"question": question, "answer": answer}
    for name, words in (("system", SYSTEM_WORDS), ("context", CONTEXT_WORDS)):
        extra = next((k for k in text if k not in mapping.values() and named(k, words)), None)
        if extra:
            mapping[name] = extra

    def why(k: str, words: set[str], shape: str) -> str:
        reasons = ["its name"] if named(k, words) else []
        if k == question and stats[k]["asks"]:
            reasons.append(f'{stats[k]["asks"]} of {stats[k]["count"]} values end in "?"')
        return " and ".join(reasons) or shape

    reason = (f'"{question}" is the question ({why(question, QUESTION_WORDS, "the shorter text")}), '
              f'"{answer}" the answer ({why(answer, ANSWER_WORDS, "the longer text")})')
    return mapping, reason
