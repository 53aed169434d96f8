#!/usr/bin/env python3
"""Generate the Mosquitto ACL (and, optionally, passwords) for a csi-pipeline deployment.

Every access point gets its own MQTT user, named ``{site}/{ap}``, that may only
  * publish its segments  ``{prefix}/{site}/{ap}/seg``  and its status ``.../status``,
  * subscribe to its own control topic ``{prefix}/{site}/{ap}/ctl``.
Each cloud worker gets its own user (``--cloud-user``, repeatable; default ``csi-cloud``), that
may read every AP's segments and status, write every ``ctl``, ``pred``, ``event`` and
``availability`` topic, and publish Home Assistant discovery configs
(``{homeassistant}/+/+/+/config``; no other user may). Optional reader users (dashboards, Home
Assistant) may read ``status``, ``pred``, ``event``, ``availability`` and the discovery configs.
Optional site users (``--site-user USER=SITE``) may act as *any* AP of one site: publish
``{prefix}/{site}/+/seg`` and ``.../status``, read ``{prefix}/{site}/+/ctl``. They exist for
a replay edge that streams several APs of a demo site from one process over one connection;
the APs of such a site are not isolated from one another.

The broker runs with ``use_username_as_clientid true`` (mosquitto.conf): a connection's client
id IS its user name, so no credentials can take over another user's session (the cloud's
queued segments, another AP's connection), and each user has exactly one session. That is why
every cloud worker needs a user of its own, and why a site user's streams share one
connection (``csi edge`` does this by itself when it logs in with a user name).

Mosquitto's ``pattern`` lines substitute ``%u``/``%c`` only as a whole topic level and never
for names holding ``/``, so one pattern cannot map a user to the two levels ``{site}/{ap}``;
hence one ``user`` block per AP, generated here from the list of APs.

Names follow the one rule of ``csi_edge/names.py`` (ASCII letters, digits, ``_``, ``-``, ``.``,
starting with a letter or digit, at most 64), read from the installed ``csi_edge`` or, without
it, from that file next to this one in the project checkout.

Usage::

    make-acl.py lab/ap1 lab/ap2 --acl acl                         # ACL only
    make-acl.py --aps-file aps.txt --acl acl --passwd passwd \\
        --credentials new-credentials.csv                         # + passwords for new users
    make-acl.py --aps-file aps.txt --site-user replay=demo \\
        --acl compose.acl --passwd passwd --credentials new.csv   # + the compose demo's edges
    make-acl.py --aps-file aps.txt --cloud-user csi-cloud-1 \\
        --cloud-user csi-cloud-2 --acl acl                        # two cloud workers

``--passwd`` adds a random password for every user not yet in the password file (with
``mosquitto_passwd -b``; ``--rotate`` replaces existing ones too) and writes the new
passwords to ``--credentials`` (mode 0600) for provisioning the APs. Reload the broker
afterwards (``kill -HUP``). Only the Python standard library is needed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def _name_rule() -> Callable[[object, str], str]:
    """``csi_edge.names.check_name``: installed, or loaded from the checkout's file (it needs
    only the standard library, and importing the package would pull numpy and more)."""
    try:
        from csi_edge.names import check_name
    except ImportError:
        source = Path(__file__).resolve().parents[2] / "csi_edge" / "names.py"
        spec = importlib.util.spec_from_file_location("_csi_names", source)
        if spec is None or spec.loader is None or not source.is_file():
            sys.exit(f"make-acl: cannot find the name rule: install csi-pipeline "
                     f"(pip install -e .) or run this script from the project checkout "
                     f"({source} is missing)")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        check_name = module.check_name
    return check_name  # type: ignore[no-any-return]


check_name = _name_rule()


def ap_username(site: str, ap: str) -> str:
    """The MQTT user name of an AP: unique, since neither part may contain '/'."""
    return f"{site}/{ap}"


def parse_ap(text: str) -> tuple[str, str]:
    site, sep, ap = text.strip().partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not SITE/AP")
    try:
        return check_name(site, "site"), check_name(ap, "ap")
    except ValueError as exc:
        raise ValueError(f"{text!r} is not SITE/AP: {exc}") from None


def parse_site_user(text: str) -> tuple[str, str]:
    """``USER=SITE``: one user for every AP of SITE."""
    user, sep, site = text.strip().partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not USER=SITE")
    try:
        return check_name(user, "site user"), check_name(site, "site")
    except ValueError as exc:
        raise ValueError(f"{text!r} is not USER=SITE: {exc}") from None


def _check_prefix(prefix: str) -> str:
    for level in prefix.split("/"):
        check_name(level, f"topic prefix {prefix!r} level")
    return prefix


def make_acl(aps: list[tuple[str, str]], *, prefix: str = "csi/v1",
             cloud_users: tuple[str, ...] = ("csi-cloud",), readers: tuple[str, ...] = (),
             site_users: tuple[tuple[str, str], ...] = (),
             homeassistant_prefix: str = "homeassistant") -> str:
    """The ACL file text. ``site_users`` are (user, site) pairs: one user for all APs of a
    site."""
    _check_prefix(prefix)
    _check_prefix(homeassistant_prefix)
    if not cloud_users:
        raise ValueError("at least one cloud user is needed")
    for user in (*cloud_users, *readers):
        check_name(user, "user")
    names = [*cloud_users, *readers, *(user for user, _ in site_users)]
    if len(set(names)) != len(names):
        raise ValueError(f"user names must differ (cloud, readers, site users): {names}")
    discovery = f"{homeassistant_prefix}/+/+/+/config"
    lines = ["# Generated by deploy/mosquitto/make-acl.py; edit the AP list, not this file.",
             "# No topic line comes before the first 'user' line: nothing is allowed to",
             "# anonymous clients (and allow_anonymous is false anyway). The broker makes each",
             "# connection's client id its user name (use_username_as_clientid).", ""]
    for user in cloud_users:
        lines += ["# a cloud worker (one user per worker)", f"user {user}",
                  f"topic read {prefix}/+/+/seg",
                  f"topic read {prefix}/+/+/status",
                  f"topic write {prefix}/+/+/ctl",
                  f"topic write {prefix}/+/+/pred",
                  f"topic write {prefix}/+/+/event",
                  f"topic write {prefix}/+/+/availability",
                  f"topic write {discovery}", ""]
    for reader in readers:
        lines += ["# read-only: dashboards, monitoring, Home Assistant", f"user {reader}",
                  f"topic read {prefix}/+/+/status", f"topic read {prefix}/+/+/pred",
                  f"topic read {prefix}/+/+/event", f"topic read {prefix}/+/+/availability",
                  f"topic read {discovery}", ""]
    for user, site in site_users:
        base = f"{prefix}/{site}/+"
        lines += [f"# every AP of site {site!r} (one replay edge process; not isolated from "
                  "each other)", f"user {user}", f"topic write {base}/seg",
                  f"topic write {base}/status", f"topic read {base}/ctl", ""]
    seen: set[str] = set()
    for site, ap in aps:
        user = ap_username(site, ap)
        if user in seen:
            continue
        seen.add(user)
        base = f"{prefix}/{site}/{ap}"
        lines += [f"user {user}", f"topic write {base}/seg", f"topic write {base}/status",
                  f"topic read {base}/ctl", ""]
    return "\n".join(lines)


def _passwd_users(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.split(":", 1)[0] for line in path.read_text().splitlines()
            if ":" in line and not line.startswith("#")}


def add_passwords(passwd: Path, users: list[str], *, rotate: bool = False,
                  binary: str = "mosquitto_passwd") -> dict[str, str]:
    """Random passwords for the users not in ``passwd`` yet (all with ``rotate``)."""
    tool = shutil.which(binary) or binary
    existing = _passwd_users(passwd)
    created: dict[str, str] = {}
    for user in users:
        if user in existing and not rotate:
            continue
        password = secrets.token_urlsafe(24)
        args = [tool, "-b", str(passwd), user, password]
        if not passwd.exists():
            args.insert(1, "-c")
        subprocess.run(args, check=True, capture_output=True)
        created[user] = password
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("aps", nargs="*", metavar="SITE/AP")
    parser.add_argument("--aps-file", type=Path, help="one SITE/AP per line ('#' comments)")
    parser.add_argument("--prefix", default="csi/v1", help="topic prefix [csi/v1]")
    parser.add_argument("--cloud-user", action="append", default=[],
                        help="a cloud worker's user, one per worker (repeatable) [csi-cloud]")
    parser.add_argument("--reader", action="append", default=[],
                        help="read-only user for status, pred and Home Assistant discovery "
                             "(repeatable)")
    parser.add_argument("--homeassistant-prefix", default="homeassistant",
                        help="Home Assistant discovery prefix [homeassistant]")
    parser.add_argument("--site-user", action="append", default=[], metavar="USER=SITE",
                        help="one user for every AP of SITE, e.g. replicated replay edges "
                             "(repeatable)")
    parser.add_argument("--acl", type=Path, help="write the ACL here [stdout]")
    parser.add_argument("--passwd", type=Path, help="password file to add new users to")
    parser.add_argument("--credentials", type=Path,
                        help="CSV for the new passwords (site,ap,username,password)")
    parser.add_argument("--rotate", action="store_true",
                        help="new passwords for existing users too")
    parser.add_argument("--mosquitto-passwd", default="mosquitto_passwd")
    args = parser.parse_args(argv)
    try:
        texts = list(args.aps)
        if args.aps_file:
            texts += [line.split("#", 1)[0] for line in args.aps_file.read_text().splitlines()]
        aps = [parse_ap(t) for t in texts if t.strip()]
        site_users = tuple(parse_site_user(t) for t in args.site_user)
        cloud_users = tuple(args.cloud_user) or ("csi-cloud",)
        acl = make_acl(aps, prefix=args.prefix, cloud_users=cloud_users,
                       readers=tuple(args.reader), site_users=site_users,
                       homeassistant_prefix=args.homeassistant_prefix)
    except (ValueError, OSError) as exc:
        print(f"make-acl: {exc}", file=sys.stderr)
        return 2
    if args.acl:
        args.acl.write_text(acl)
    else:
        sys.stdout.write(acl)
    if args.passwd:
        users = [*cloud_users, *args.reader, *(u for u, _ in site_users),
                 *(ap_username(s, a) for s, a in aps)]
        try:
            created = add_passwords(args.passwd, users, rotate=args.rotate,
                                    binary=args.mosquitto_passwd)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"make-acl: mosquitto_passwd failed: {exc}", file=sys.stderr)
            return 1
        sites = {ap_username(s, a): (s, a) for s, a in aps}
        sites.update({user: (site, "+") for user, site in site_users})
        if created and args.credentials:
            fd = os.open(args.credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["site", "ap", "username", "password"])
                for user, password in created.items():
                    site, ap = sites.get(user, ("", ""))
                    writer.writerow([site, ap, user, password])
        elif created:
            print(f"make-acl: {len(created)} new password(s) set; pass --credentials to keep "
                  "them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
