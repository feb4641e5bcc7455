"""Workspaces and their resource groups (locations)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import cast

from sqlalchemy import bindparam
from sqlmodel import Column, Field, Session, SQLModel, col, delete, select
from sqlmodel.sql.expression import Select

from models.errors import ResourceGroupRequired, UnknownResourceGroup, UnknownWorkspace
from models.text import is_identifier
from models.types import UTCDateTime, utc_now
from models.upsert import chunks

#: Longest identifier (contract, workspace, resource group, section), in characters.
IDENTIFIER_MAX_LENGTH = 128


class Workspace(SQLModel, table=True):
    """A coworking workspace that sends contracts."""

    __tablename__ = "workspaces"

    id: str = Field(primary_key=True, max_length=IDENTIFIER_MAX_LENGTH)
    created_at: datetime = Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(default_factory=utc_now, sa_column=Column(UTCDateTime(), nullable=False))


class ResourceGroup(SQLModel, table=True):
    """A location of a workspace; a contract names one when there are several."""

    __tablename__ = "resource_groups"

    workspace_id: str = Field(primary_key=True, foreign_key="workspaces.id", max_length=IDENTIFIER_MAX_LENGTH)
    id: str = Field(primary_key=True, max_length=IDENTIFIER_MAX_LENGTH)


def set_workspace(session: Session, workspace_id: str, resource_group_ids: list[str]) -> Workspace:
    """Create or replace a workspace and its resource groups (the caller commits)."""
    if not resource_group_ids:
        raise ValueError("a workspace has at least one resource group")
    for value in [workspace_id, *resource_group_ids]:
        if len(value) > IDENTIFIER_MAX_LENGTH:
            raise ValueError(
                f"{value[:40]!r}... is {len(value)} characters long; an identifier has at most "
                f"{IDENTIFIER_MAX_LENGTH}"
            )
        if not is_identifier(value):
            raise ValueError(f"{value!r} is not a valid identifier (letters, digits, '.', '_', '-')")
    workspace = session.get(Workspace, workspace_id, with_for_update=True)
    now = utc_now()
    if workspace is None:
        workspace = Workspace(id=workspace_id, created_at=now, updated_at=now)
        session.add(workspace)
        session.flush()
    else:
        workspace.updated_at = now
        session.exec(delete(ResourceGroup).where(col(ResourceGroup.workspace_id) == workspace_id))
    for resource_group_id in dict.fromkeys(resource_group_ids):
        session.add(ResourceGroup(workspace_id=workspace_id, id=resource_group_id))
    return workspace


def workspace_group_pairs() -> Select[str, str]:
    """(workspace id, resource group id) rows, unordered: the workspaces outer-joined to
    their groups, so that a workspace without groups still gives a row (group NULL)."""
    return select(Workspace.id, ResourceGroup.id).outerjoin(
        ResourceGroup, col(ResourceGroup.workspace_id) == col(Workspace.id)
    )


def _workspace_groups() -> Select[str, str]:
    return workspace_group_pairs().order_by(col(Workspace.id), col(ResourceGroup.id))


# Built once: the hot path (every send_contract) reuses its cache key.
_ONE_WORKSPACE = _workspace_groups().where(col(Workspace.id) == bindparam("workspace_id"))


def fold_groups(rows: Iterable[tuple[str, str | None]], into: dict[str, list[str]]) -> dict[str, list[str]]:
    """Group ``workspace_group_pairs`` rows by workspace, into ``into`` (a NULL group adds none)."""
    for workspace_id, group in rows:
        found = into.setdefault(workspace_id, [])
        if group is not None:
            found.append(group)
    return into


def resource_groups_of(session: Session, workspace_id: str) -> list[str] | None:
    """The resource group ids of a workspace, or None if it is not registered (one round trip)."""
    # On the connection: plain rows, without the ORM's result processing.
    rows = session.connection().execute(_ONE_WORKSPACE, {"workspace_id": workspace_id})
    return fold_groups(cast(Iterable[tuple[str, str | None]], rows), {}).get(workspace_id)


def all_workspaces(session: Session) -> dict[str, list[str]]:
    """Every registered workspace's resource group ids, both in order of their ids."""
    return fold_groups(session.exec(_workspace_groups()), {})


def resource_groups_of_many(session: Session, workspace_ids: Iterable[str]) -> dict[str, list[str]]:
    """``resource_groups_of`` for many workspaces, one round trip per 500; unregistered ones are absent."""
    groups: dict[str, list[str]] = {}
    for chunk in chunks(sorted(set(workspace_ids))):
        fold_groups(session.exec(_workspace_groups().where(col(Workspace.id).in_(chunk))), groups)
    return groups


def choose_resource_group(workspace_id: str, resource_group_id: str | None, groups: list[str] | None) -> str:
    """Rule 1: the client's resource group, required when the workspace has several.

    On a workspace's resource groups as read (None: the workspace is not registered).
    """
    if groups is None:
        raise UnknownWorkspace(f"workspace {workspace_id!r} is not registered")
    if resource_group_id is None:
        if len(groups) > 1:
            raise ResourceGroupRequired(
                f"workspace {workspace_id!r} has {len(groups)} resource groups: "
                "say which one the client joins"
            )
        return groups[0]
    if resource_group_id not in groups:
        raise UnknownResourceGroup(
            f"resource group {resource_group_id!r} is not one of workspace {workspace_id!r}'s resource groups"
        )
    return resource_group_id
