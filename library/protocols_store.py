"""Key protocols of a `library.store.Library`: registering them and resolving the one a
query of a backbone follows."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from library.errors import LibraryError
from library.locks import file_lock
from library.objects import _Object, _sha256
from library.protocol import RECIPES, KeyProtocol, ProtocolMismatch, check_start, start_bytes


class Protocols:
    """The key-protocol methods of `Library` (a mixin; see `library.store`)."""

    @staticmethod
    def _check_key_protocol(conn: Any, backbone: str, protocol: KeyProtocol | None) -> None:
        """Refuse a key whose protocol is not the library's for its backbone and recipe."""
        held = {
            recipe: KeyProtocol.from_json(spec)
            for recipe, spec in conn.execute(
                "SELECT recipe, spec FROM protocols WHERE backbone = ?", (backbone,)
            )
        }
        if protocol is None:
            if held:
                raise ProtocolMismatch(
                    f"keys of backbone {backbone} in this library follow the key protocols "
                    f"{sorted(p.id for p in held.values())}; this key records none"
                )
            return
        mine = held.get(protocol.recipe)
        if mine is None:
            raise ProtocolMismatch(
                f"this library has no {protocol.recipe!r} key protocol for backbone {backbone}; "
                f"register protocol {protocol.id} first (Library.register_protocol)"
            )
        if mine != protocol:
            raise ProtocolMismatch(
                f"this key was made by {protocol.recipe} protocol {protocol.id}, the library's is "
                f"{mine.id}; they differ in " + "; ".join(protocol.differences(mine))
            )

    def register_protocol(
        self, protocol: KeyProtocol, start: Any, *, default: bool = False
    ) -> KeyProtocol:
        """Record how keys of `protocol.backbone` and `protocol.recipe` are made, with its start
        prompt [L, d]. Idempotent; a different protocol for the same backbone and recipe is
        refused (ProtocolMismatch naming what differs). The backbone's first protocol, or one
        registered with `default`, is the one queries use when they name no recipe."""
        data = start_bytes(start, protocol.backbone)
        array = check_start(protocol, data)
        obj = _Object(data, _sha256(data), {})
        with file_lock(self._lock_path, shared=True), self._manifest.write() as conn:
            self._ensure_backbone(conn, protocol.backbone, array.shape[1])
            row = conn.execute(
                "SELECT spec FROM protocols WHERE backbone = ? AND recipe = ?",
                (protocol.backbone, protocol.recipe),
            ).fetchone()
            if row is not None and KeyProtocol.from_json(row[0]) != protocol:
                held = KeyProtocol.from_json(row[0])
                raise ProtocolMismatch(
                    f"this library's {protocol.recipe} key protocol for {protocol.backbone} is "
                    f"{held.id}; protocol {protocol.id} differs in "
                    + "; ".join(protocol.differences(held))
                )
            (count,) = conn.execute(
                "SELECT count(*) FROM protocols WHERE backbone = ?", (protocol.backbone,)
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO protocols (id, backbone, recipe, spec, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (protocol.id, protocol.backbone, protocol.recipe, protocol.to_json(),
                     time.time()),
                )
            if default or count == 0:
                conn.execute(
                    "UPDATE protocols SET is_default = (id = ?) WHERE backbone = ?",
                    (protocol.id, protocol.backbone),
                )
            self._write_object(obj)
        return protocol

    def protocols(self, backbone: str | None = None) -> list[tuple[KeyProtocol, bool]]:
        """Every key protocol (of `backbone`, if given) with whether it is its backbone's default."""
        with self._manifest.read() as conn:
            rows = conn.execute(
                "SELECT spec, is_default FROM protocols WHERE ?1 IS NULL OR backbone = ?1 "
                "ORDER BY backbone, recipe",
                (backbone,),
            ).fetchall()
        return [(KeyProtocol.from_json(spec), bool(is_default)) for spec, is_default in rows]

    def resolve_protocol(self, backbone: str, recipe: str | None = None) -> KeyProtocol | None:
        """The protocol a query of `backbone` uses: `recipe`'s, else the default; None when the
        backbone's keys record no protocol (a library from before protocols)."""
        held = self.protocols(backbone)
        if recipe is not None:
            if recipe not in RECIPES:
                raise LibraryError(f"unknown key recipe {recipe!r}; choose one of {RECIPES}")
            for protocol, _ in held:
                if protocol.recipe == recipe:
                    return protocol
            raise LibraryError(
                f"this library has no {recipe!r} key protocol for backbone {backbone}; it has "
                f"{sorted(p.recipe for p, _ in held) or 'none'}"
            )
        return next((protocol for protocol, default in held if default), None)

    def protocol_start(self, protocol: KeyProtocol) -> np.ndarray:
        """The start prompt [L, d] of a registered protocol, checked against its hash."""
        with file_lock(self._lock_path, shared=True):
            return check_start(protocol, self._read_object(f"protocol {protocol.id}", protocol.start))

    def protocol(
        self, backbone: str, recipe: str | None = None
    ) -> tuple[KeyProtocol, np.ndarray] | None:
        """The protocol a query of `backbone` follows (see `resolve_protocol`) and its start
        prompt; None when the backbone's keys record no protocol."""
        protocol = self.resolve_protocol(backbone, recipe)
        return None if protocol is None else (protocol, self.protocol_start(protocol))
