"""A synthetic Debian system to benchmark against: files plus a dpkg database.

``build(directory, entries)`` writes, under ``directory/root``, about
``entries`` filesystem entries (files, directories, symlinks), about 60% of
them installed by S packages recorded in ``var/lib/dpkg`` (``status``,
``info/*.list``, ``info/*.md5sums``, conffiles), the rest the admin's:
``/home``, ``/var/lib``, ``/usr/local``, ``/srv``, ``/opt``, modified
conffiles, a ``CACHEDIR.TAG``-ged cache.  Shapes follow a real machine: deep
``/usr`` trees, many small files (log-normal sizes around 1 KiB), some large
ones, usrmerge symlinks with a few packages listing ``/bin/...`` paths.

Everything is deterministic for a given ``entries`` and written with os.*
calls relative to directory file descriptors.  The result is cached:
``directory/meta.json`` is written last, and ``build`` returns it unchanged
when it exists with the same generator version.

``change_unowned`` and ``upgrade`` mutate the tree the way a day of use and an
``apt upgrade`` do; both keep the entry count the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field

GENERATOR_VERSION = 3
OWNED_SHARE = 0.6
ARCH = b"amd64"
LANGS = [b"de", b"fr", b"es", b"it", b"ja", b"pt_BR", b"ru", b"zh_CN"]
USRMERGE = (b"bin", b"sbin", b"lib", b"lib64")
BLOB_SIZE = 32 << 20
BIG_BYTES_PER_ENTRY = 1000  # about 200 MB of large files at 200k entries
SHAPES = [  # (base directory with {n} for the package name, extensions, weight)
    (b"usr/lib/x86_64-linux-gnu/{n}", [b".so", b".so.1", b".dat", b".bin"], 3),
    (b"usr/lib/python3/dist-packages/{n}", [b".py", b".py", b".pyi", b".json"], 3),
    (b"usr/share/{n}", [b".png", b".svg", b".xml", b".txt", b".ui"], 3),
    (b"usr/share/perl5/{n}", [b".pm", b".pl"], 1),
    (b"usr/share/javascript/{n}", [b".js", b".min.js", b".css", b".map"], 1),
    (b"usr/include/{n}", [b".h", b".hpp"], 1),
]


@dataclass
class Plan:
    dirs: set = field(default_factory=set)  # relative paths, no leading slash
    files: dict = field(default_factory=dict)  # relative path -> (offset, size)
    symlinks: dict = field(default_factory=dict)  # relative path -> target
    packages: list = field(default_factory=list)  # [Package]
    unowned: list = field(default_factory=list)  # regular files the admin owns


@dataclass
class Package:
    name: bytes
    listed: list  # absolute paths as .list records them (regular files, symlinks)
    files: list  # absolute listed paths of regular files (-> md5sums unless conffile)
    conffiles: list


class Builder:
    def __init__(self, entries: int, seed: int = 1):
        self.rng = random.Random(seed)
        self.entries = entries
        self.plan = Plan()

    # -- shapes ---------------------------------------------------------------

    def small_size(self) -> int:
        return min(int(self.rng.lognormvariate(math.log(800), 1.1)), 256 << 10)

    def add_file(self, path: bytes, size: int | None = None) -> bytes:
        if size is None:
            size = self.small_size()
        self.plan.files[path] = (self.rng.randrange(max(1, BLOB_SIZE - size)), size)
        parent = path.rpartition(b"/")[0]
        while parent and parent not in self.plan.dirs:
            self.plan.dirs.add(parent)
            parent = parent.rpartition(b"/")[0]
        return path

    def tree(self, base: bytes, n: int, exts: list, leaf: tuple = (6, 30), depth: int = 0) -> list:
        """``n`` files in a directory tree under ``base``: fan-out 3-10, depth grows with log(n)."""
        rng = self.rng
        here = n if n <= leaf[1] or depth >= 7 else rng.randint(0, leaf[0])
        out = [self.add_file(b"%s/f%05d%s" % (base, i, rng.choice(exts))) for i in range(here)]
        rest = n - here
        if rest:
            k = min(rest, rng.randint(3, 10))
            cuts = sorted(rng.sample(range(1, rest), k - 1)) if k > 1 else []
            bounds = [0, *cuts, rest]
            for i in range(k):
                out += self.tree(b"%s/d%02d" % (base, i), bounds[i + 1] - bounds[i], exts, leaf, depth + 1)
        return out

    # -- packages -------------------------------------------------------------

    def packages(self, file_budget: int, big_budget: int) -> None:
        rng = self.rng
        count = max(20, self.entries // 200)
        weights = sorted((rng.paretovariate(1.1) for _ in range(count)), reverse=True)
        total = sum(weights)
        shape_weights = [w for _, _, w in SHAPES]
        for i, w in enumerate(weights):
            name = b"pkg%04d" % i
            n = max(2, min(int(file_budget * w / total), file_budget // 12))
            base, exts, _ = rng.choices(SHAPES, shape_weights)[0]
            if i == 0:
                base, exts = b"usr/lib/modules/6.1.0-18-amd64/kernel", [b".ko"]
            regular: list = []
            conffiles: list = []
            symlinks: list = []
            regular += self.tree(base.replace(b"{n}", name), n, exts)
            regular.append(self.add_file(b"usr/share/doc/%s/copyright" % name))
            regular.append(self.add_file(b"usr/share/doc/%s/changelog.Debian.gz" % name))
            listed_as = {}
            if rng.random() < 0.4:
                binary = self.add_file(b"usr/bin/%s" % name, rng.randint(20_000, 400_000))
                regular.append(binary)
                if rng.random() < 0.08:  # an old package listing /bin on a merged-/usr system
                    listed_as[binary] = b"bin/%s" % name
            if rng.random() < 0.25:
                conffiles.append(self.add_file(b"etc/%s/%s.conf" % (name, name)))
            if rng.random() < 0.3:
                for lang in rng.sample(LANGS, 5):
                    regular.append(self.add_file(b"usr/share/locale/%s/LC_MESSAGES/%s.mo" % (lang, name)))
            if rng.random() < 0.2:
                regular.append(self.add_file(b"usr/share/man/man1/%s.1.gz" % name))
            if b"x86_64" in base and regular:
                link = b"usr/lib/x86_64-linux-gnu/lib%s.so" % name
                self.plan.symlinks[link] = b"%s/%s" % (name, regular[0].rsplit(b"/", 1)[1])
                symlinks.append(link)
            if i % 50 == 7 and big_budget > 0:  # firmware, data packages
                size = min(big_budget, rng.randint(2 << 20, 24 << 20))
                big_budget -= size
                regular.append(self.add_file(b"usr/share/%s/data.bin" % name, size))
            listed = [b"/" + listed_as.get(p, p) for p in regular + conffiles + symlinks]
            self.plan.packages.append(Package(
                name, listed, [b"/" + listed_as.get(p, p) for p in regular], [b"/" + p for p in conffiles],
            ))

    # -- the admin's files ----------------------------------------------------

    def unowned(self, file_budget: int, big_budget: int) -> None:
        rng = self.rng
        users = max(2, self.entries // 40_000)
        start = len(self.plan.files)
        share = {"home": 0.42, "varlib": 0.2, "local": 0.12, "srv": 0.1, "opt": 0.08, "cache": 0.03}
        n = {k: int(file_budget * v) for k, v in share.items()}
        for u in range(users):
            home = b"home/user%d" % u
            per = n["home"] // users
            git = per // 3
            for _ in range(git):
                h = b"%032x" % rng.getrandbits(128)
                self.add_file(b"%s/src/project/.git/objects/%s/%s" % (home, h[:2], h[2:]), rng.randint(100, 4000))
            self.tree(home + b"/src/project/src", per // 3, [b".c", b".py", b".md", b".rs"])
            self.tree(home + b"/Documents", per - 2 * (per // 3) - 20, [b".odt", b".pdf", b".txt"], leaf=(10, 60))
            for name in (b".bashrc", b".profile", b".bash_history", b".config/app/settings.ini"):
                self.add_file(home + b"/" + name)
            cache = home + b"/.cache"
            self.add_file(cache + b"/CACHEDIR.TAG", 0)
            self.tree(cache + b"/thumbnails", n["cache"] // users, [b".png"])
        apps = max(3, self.entries // 50_000)
        for app in range(apps):
            self.tree(b"var/lib/app%d/sessions" % app, n["varlib"] // max(4, apps), [b".sess", b".json"])
        self.tree(b"usr/local/lib/python3.11/dist-packages", n["local"], [b".py", b".pyc"])
        self.tree(b"srv/www/site", n["srv"], [b".html", b".css", b".js", b".jpg"])
        self.tree(b"opt/vendor/app", n["opt"], [b".jar", b".xml", b".so"])
        for name in (b"etc/hostname", b"etc/fstab.local", b"root/.bash_history", b"root/.ssh/authorized_keys"):
            self.add_file(name)
        for i in range(max(5, self.entries // 20_000)):
            self.add_file(b"var/log/app%d.log" % i, rng.randint(100_000, 4 << 20))
        # large files: databases, images, archives
        i = 0
        while big_budget > 0:
            size = min(big_budget, int(rng.lognormvariate(math.log(6 << 20), 0.8)))
            where = rng.choice([b"var/lib/app0/db", b"home/user0/Pictures", b"home/user1/Videos", b"srv/backups"])
            self.add_file(b"%s/big%04d.bin" % (where, i), size)
            big_budget -= size
            i += 1
        self.plan.unowned = list(self.plan.files)[start:]

    def build(self) -> Plan:
        files = int(self.entries * 0.9)  # the rest are directories and symlinks
        big = self.entries * BIG_BYTES_PER_ENTRY
        self.packages(int(files * OWNED_SHARE), big * 2 // 5)
        self.unowned(files - len(self.plan.files), big * 3 // 5)
        return self.plan


# -- writing ------------------------------------------------------------------


def _blob() -> bytes:
    return random.Random(42).randbytes(BLOB_SIZE)


def _content(blob: bytes, offset: int, size: int) -> bytes:
    if size <= BLOB_SIZE - offset:
        return blob[offset:offset + size]
    return (blob * (size // BLOB_SIZE + 2))[offset:offset + size]


def write_tree(root: bytes, plan: Plan) -> dict[bytes, str]:
    """Create the plan under ``root``; returns the md5 of every regular file."""
    blob = _blob()
    md5 = {}
    for d in sorted(plan.dirs):
        os.makedirs(root + b"/" + d, exist_ok=True)
    by_dir: dict[bytes, list] = {}
    for path in plan.files:
        parent, _, name = path.rpartition(b"/")
        by_dir.setdefault(parent, []).append((path, name))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for parent, names in by_dir.items():
        dfd = os.open(root + b"/" + parent if parent else root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for path, name in names:
                data = _content(blob, *plan.files[path])
                fd = os.open(name, flags, 0o644, dir_fd=dfd)
                os.write(fd, data)
                os.close(fd)
                md5[path] = hashlib.md5(data).hexdigest()
        finally:
            os.close(dfd)
    for link, target in plan.symlinks.items():
        os.symlink(target, root + b"/" + link)
    return md5


def write_dpkg(root: bytes, plan: Plan, md5: dict[bytes, str]) -> None:
    info = root + b"/var/lib/dpkg/info"
    os.makedirs(info, exist_ok=True)
    os.makedirs(root + b"/var/lib/dpkg/updates", exist_ok=True)
    os.makedirs(root + b"/var/lib/apt", exist_ok=True)
    _write(info + b"/format", b"1\n")
    _write(root + b"/var/lib/dpkg/diversions", b"")
    _write(root + b"/var/lib/apt/extended_states", b"")
    status = []
    for pkg in plan.packages:
        listed = set()
        for path in pkg.listed:
            listed.add(path)
            parent = path.rpartition(b"/")[0]
            while parent and parent not in listed:
                listed.add(parent)
                parent = parent.rpartition(b"/")[0]
        _write(info + b"/" + pkg.name + b".list", b"/.\n" + b"".join(p + b"\n" for p in sorted(listed)))
        conf = set(pkg.conffiles)
        sums = b"".join(
            b"%s  %s\n" % (md5[_real(p)].encode(), p[1:]) for p in pkg.files if p not in conf
        )
        _write(info + b"/" + pkg.name + b".md5sums", sums)
        status.append(status_paragraph(pkg, b"1.0-1", {p: md5.get(_real(p), "0" * 32) for p in pkg.conffiles}))
    _write(root + b"/var/lib/dpkg/status", b"".join(status))


def status_paragraph(pkg: Package, version: bytes, conf_md5: dict) -> bytes:
    lines = [
        b"Package: " + pkg.name,
        b"Status: install ok installed",
        b"Priority: optional",
        b"Section: misc",
        b"Installed-Size: 1024",
        b"Maintainer: Bench <bench@example.org>",
        b"Architecture: " + ARCH,
        b"Version: " + version,
    ]
    if conf_md5:
        lines.append(b"Conffiles:")
        lines += [b" %s %s" % (p, conf_md5[p].encode()) for p in pkg.conffiles]
    lines.append(b"Description: synthetic package " + pkg.name)
    return b"\n".join(lines) + b"\n\n"


def _real(listed: bytes) -> bytes:
    """The relative on-disk path of a listed path (usrmerge: /bin -> usr/bin)."""
    rel = listed[1:]
    head, _, rest = rel.partition(b"/")
    return b"usr/" + rel if head in USRMERGE and rest else rel


def _write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def build(directory: str, entries: int) -> dict:
    """The system for ``entries`` under ``directory`` (built now or found cached); its meta."""
    meta_path = os.path.join(directory, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("version") == GENERATOR_VERSION and meta.get("target_entries") == entries:
            return meta
    except (OSError, ValueError):
        pass
    started = time.monotonic()
    if os.path.exists(directory):
        shutil.rmtree(directory)
    root = os.fsencode(os.path.join(directory, "root"))
    os.makedirs(root)
    for name in USRMERGE:
        os.makedirs(root + b"/usr/" + name, exist_ok=True)
        os.symlink(b"usr/" + name, root + b"/" + name)
    plan = Builder(entries).build()
    md5 = write_tree(root, plan)
    rng = random.Random(7)
    conffiles = [p for pkg in plan.packages for p in pkg.conffiles]
    edited = set(rng.sample(conffiles, len(conffiles) // 20))  # admins edited 5% of conffiles
    write_dpkg(root, plan, md5)
    for p in edited:  # after the database recorded the shipped md5
        with open(root + p, "ab") as f:
            f.write(b"\n# edited by the admin\n")
    with open(os.path.join(directory, "unowned.lst"), "wb") as f:
        f.write(b"\0".join(plan.unowned))
    meta = {
        "version": GENERATOR_VERSION,
        "target_entries": entries,
        "root": os.fsdecode(root),
        "packages": len(plan.packages),
        "entries": count_entries(root),
        "regular_files": len(plan.files),
        "owned_listed_paths": sum(len(p.listed) for p in plan.packages),
        "unowned_files": len(plan.unowned),
        "bytes": sum(size for _, size in plan.files.values()),
        "edited_conffiles": len(edited),
        "seconds": round(time.monotonic() - started, 1),
        "mutations": 0,
    }
    _save_meta(directory, meta)
    return meta


def _save_meta(directory: str, meta: dict) -> None:
    tmp = os.path.join(directory, "meta.json.new")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, "meta.json"))


def count_entries(top: bytes) -> int:
    """Entries below ``top`` (not following symlinks), by scandir."""
    count = 0
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                count += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return count


def warm(top: bytes) -> float:
    """Read every regular file below ``top`` once: the page cache then holds the
    tree, whichever tool runs next.  Returns the seconds it took."""
    started = time.monotonic()
    buf = bytearray(1 << 20)
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    try:
                        fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                    except OSError:
                        continue  # a FIFO's name reused, a file gone: nothing to warm
                    try:
                        while os.readv(fd, [buf]):
                            pass
                    finally:
                        os.close(fd)
    return round(time.monotonic() - started, 1)


# -- mutations ----------------------------------------------------------------


def _next_epoch(directory: str) -> int:
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    meta["mutations"] = meta.get("mutations", 0) + 1
    _save_meta(directory, meta)
    return meta["mutations"]


def change_unowned(directory: str, share: float = 0.01) -> int:
    """Rewrite ``share`` of the admin's files (new size and mtime); returns how many."""
    epoch = _next_epoch(directory)
    rng = random.Random(1000 + epoch)
    root = os.fsencode(os.path.join(directory, "root"))
    with open(os.path.join(directory, "unowned.lst"), "rb") as f:
        unowned = [p for p in f.read().split(b"\0") if not p.endswith(b"CACHEDIR.TAG")]
    chosen = rng.sample(unowned, max(1, int(len(unowned) * share)))
    now = time.time()
    for rel in chosen:
        with open(root + b"/" + rel, "ab") as f:
            f.write(b"change %d\n" % epoch)
        os.utime(root + b"/" + rel, (now, now))
    return len(chosen)


def upgrade(directory: str, share: float = 0.05) -> int:
    """An ``apt upgrade``: whole packages holding ``share`` of the package files get new
    versions; each file is replaced through a new inode (as dpkg does) and the database
    (``.md5sums``, ``Version``, conffile md5s) is updated.  Returns the files replaced."""
    epoch = _next_epoch(directory)
    rng = random.Random(2000 + epoch)
    root = os.fsencode(os.path.join(directory, "root"))
    admin = root + b"/var/lib/dpkg"
    with open(admin + b"/status", "rb") as f:
        paragraphs = [p for p in f.read().split(b"\n\n") if p.strip()]
    names = [p.split(b"\n", 1)[0][len(b"Package: "):] for p in paragraphs]
    sums = {}
    for name in names:
        with open(admin + b"/info/" + name + b".md5sums", "rb") as f:
            sums[name] = [line.split(b"  ", 1) for line in f.read().splitlines()]
    target = int(sum(map(len, sums.values())) * share)
    order = list(range(len(names)))
    rng.shuffle(order)
    upgraded, replaced = set(), 0
    for i in order:
        if replaced >= target:
            break
        if len(sums[names[i]]) > target - replaced + 50:
            continue  # a package too big for what is left of the budget
        upgraded.add(i)
        replaced += len(sums[names[i]])
    for i in upgraded:
        name = names[i]
        lines = []
        for _, rel in sums[name]:
            real = root + b"/" + _real(b"/" + rel)
            data = _replace(real, epoch)
            lines.append(b"%s  %s\n" % (hashlib.md5(data).hexdigest().encode(), rel))
        _write(admin + b"/info/" + name + b".md5sums", b"".join(lines))
        paragraphs[i] = _bump_version(paragraphs[i], epoch)
    _write(admin + b"/status.new", b"".join(p + b"\n\n" for p in paragraphs))
    os.replace(admin + b"/status.new", admin + b"/status")
    return replaced


def _replace(real: bytes, epoch: int) -> bytes:
    with open(real, "rb") as f:
        data = f.read()
    data = data[: len(data) // 2] + b"upgraded %d\n" % epoch + data[len(data) // 2:]
    tmp = real + b".dpkg-new"
    _write(tmp, data)
    os.replace(tmp, real)
    return data


def _bump_version(paragraph: bytes, epoch: int) -> bytes:
    out = []
    for line in paragraph.split(b"\n"):
        if line.startswith(b"Version: "):
            line = b"Version: 1.%d-1" % epoch
        out.append(line)
    return b"\n".join(out)
