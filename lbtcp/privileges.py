"""Dropping root after every socket is bound (``[global] user`` / ``group``).

The order matters: supplementary groups first (only root may clear them), then the group,
then the user (after ``setuid`` nothing else could be changed). On Linux, glibc applies each of
these calls to every thread of the process, and a change from uid 0 to another uid clears the
permitted and effective capabilities. A process that asked for a user never keeps running as
root: any failure raises ``PrivilegeError`` and the runtime exits 1.

Once dropped, the process may no longer be able to read its own installation (a Python under
``/root``, a virtualenv in a private home): ``preload`` imports what lbtcp would otherwise
import later (on a reload, on the first DNS name, on an error), while it still can.
"""

from __future__ import annotations

import grp
import importlib
import os
import pwd

# Modules imported late in lbtcp or by the standard library, on paths a reload, a lookup or
# an error report takes. Importing them before the drop makes those paths work as any user.
PRELOAD = (
    "encodings.idna",
    "encodings.latin_1",
    "encodings.utf_8",
    "importlib.readers",  # importlib.resources reads the status page (package data) with it
    "importlib.resources",
    "json",
    "lbtcp.admin.status",  # imported on the first GET /status
    "lbtcp.balancing",
    "lbtcp.config",
    "lbtcp.metrics",  # and prometheus_client, on the first GET /metrics
    "lbtcp.reload",
    "linecache",
    "traceback",
    "tomllib",
    "concurrent.futures.thread",
)


class PrivilegeError(Exception):
    """Could not become the configured user/group."""


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - e.g. tomllib on Python 3.10 (tomli instead)
            continue


def drop_privileges(user: str, group: str = "") -> str:
    """Become ``user`` (and ``group``, default the user's primary group) with no
    supplementary groups. Returns a short description for the log."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"no user named {user!r}") from None
    uid = entry.pw_uid
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"no group named {group!r}") from None
    preload()
    try:
        if os.getuid() != 0 and os.geteuid() != 0:
            if (os.getuid(), os.getgid()) == (uid, gid) and not os.getgroups():
                return f"already running as {user} (uid {uid}, gid {gid})"
            raise PrivilegeError(
                f"cannot switch to user {user!r}: lbtcp runs as uid {os.getuid()}, not root"
            )
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot switch to user {user!r} (uid {uid}, gid {gid}): {exc.strerror or exc}"
        ) from None
    # Trust, but check: a half-done switch must not go unnoticed.
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid or os.getegid() != gid:
        raise PrivilegeError(f"switching to user {user!r} did not take effect")
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError(f"after switching to {user!r} the process could become root again")
    return f"running as {user} (uid {uid}, gid {gid}), supplementary groups cleared"
