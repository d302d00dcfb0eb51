"""`/schema/<dotted.target>` in a defaults list: the config schema of that constructor, or the
dataclass itself when the name is one (train.yaml's root, `seqexp.config.TrainConfig`).

A config source (Hydra's plugin kind for where configs come from) that answers only paths
under `schema/`, and a search-path plugin that adds it, so a YAML file anywhere on the search
path -- seqexp's own, or a user's under `hydra.searchpath` -- can name the schema of its
`_target_`. The module named is imported only when a config file names it -- so a script that
composes train.yaml needs no import of seqexp's own to make its schema known.
"""

from __future__ import annotations

from typing import List, Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

GROUP = "schema"


class SchemaSource(ConfigSource):
    @staticmethod
    def scheme() -> str:
        return "seqexp-schema"

    @staticmethod
    def _target(config_path: str) -> Optional[str]:
        group, _, name = config_path.strip("/").partition("/")
        name = name.removesuffix(".yaml")
        return name if group == GROUP and "." in name and "/" not in name else None

    def load_config(self, config_path: str) -> ConfigResult:
        import dataclasses

        from seqexp.build import locate
        from seqexp.errors import UserError
        from seqexp.schema import schema_for

        target = self._target(config_path)
        try:
            found = locate(target)
            node = OmegaConf.structured(found if dataclasses.is_dataclass(found) else schema_for(target))
        except UserError as e:
            raise ConfigLoadError(f"schema {target}: {e}") from None
        return ConfigResult(provider="seqexp", path=self.full_path(), config=node, header={"package": None})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") == GROUP

    def is_config(self, config_path: str) -> bool:
        return self._target(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        return []  # schemas are named by the files that use them, not chosen: nothing to list


class SchemaSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="seqexp", path=f"{SchemaSource.scheme()}://")
