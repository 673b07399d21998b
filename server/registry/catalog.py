"""What the model owner registers: models, stored artifacts (by sha256) and emulators."""

from __future__ import annotations

from sqlalchemy import select

from .errors import Conflict, NotFound
from .store import Store
from .tables import ArtifactRow, EmulatorRow, ModelRow, new_id


class Catalog(Store):
    """Models, artifacts and emulators."""

    # ---- models ---------------------------------------------------------------------------
    def add_model(
        self, name: str, source: str, family: str = "", digest: str = "", num_layers: int = 0, description: str = ""
    ) -> ModelRow:
        with self.session() as s:
            if s.scalar(select(ModelRow).where(ModelRow.name == name)) is not None:
                raise Conflict(f"a model named {name!r} is already registered; pick another name")
            row = ModelRow(
                id=new_id("mdl"),
                name=name,
                source=source,
                family=family,
                digest=digest,
                num_layers=num_layers,
                description=description,
            )
            s.add(row)
        return row

    def get_model(self, id_or_name: str) -> ModelRow:
        with self.session() as s:
            row = s.get(ModelRow, id_or_name) or s.scalar(select(ModelRow).where(ModelRow.name == id_or_name))
            if row is None:
                raise NotFound(f"no model {id_or_name!r}; `offsite-admin models list` shows the registered ones")
            return row

    def list_models(self, limit: int | None = None) -> list[ModelRow]:
        return self._list(select(ModelRow).order_by(ModelRow.created_at), limit)

    # ---- artifacts ------------------------------------------------------------------------
    def add_artifact(self, sha256: str, size: int, kind: str = "blob", name: str = "") -> ArtifactRow:
        with self.session() as s:
            row = s.get(ArtifactRow, sha256)
            if row is None:
                row = ArtifactRow(sha256=sha256, size=size, kind=kind, name=name)
                s.add(row)
            return row

    def get_artifact(self, sha256: str) -> ArtifactRow:
        return self._get(ArtifactRow, sha256, "artifact")

    def find_artifact(self, sha256: str) -> ArtifactRow | None:
        with self.session() as s:
            return s.get(ArtifactRow, sha256)

    # ---- emulators ------------------------------------------------------------------------
    def add_emulator(
        self, model_id: str, bundle_sha256: str, config: dict, manifest: dict, operation_id: str = ""
    ) -> EmulatorRow:
        row = EmulatorRow(
            id=new_id("emu"),
            model_id=model_id,
            bundle_sha256=bundle_sha256,
            config=config,
            manifest=manifest,
            operation_id=operation_id,
        )
        with self.session() as s:
            s.add(row)
        return row

    def get_emulator(self, emulator_id: str) -> EmulatorRow:
        return self._get(EmulatorRow, emulator_id, "emulator")

    def list_emulators(self, model_id: str | None = None, limit: int | None = None) -> list[EmulatorRow]:
        stmt = select(EmulatorRow).order_by(EmulatorRow.created_at)
        if model_id:
            stmt = stmt.where(EmulatorRow.model_id == model_id)
        return self._list(stmt, limit)
