"""Loading /etc/jwbackup.yaml: defaults, the jw.backup 1.0 format, and one-line errors."""

from __future__ import annotations

import dataclasses
import os
import socket
import textwrap
import time

import pytest

from jwbackup import config
from jwbackup.config import Config, Destination, Keep
from jwbackup.errors import ConfigError


@pytest.fixture
def write(tmp_path):
    """Write a config file (dedented) with mode 0600; returns its path as str."""

    def write(text: str | bytes, name: str = "jwbackup.yaml", mode: int = 0o600) -> str:
        path = tmp_path / name
        if isinstance(text, str):
            text = textwrap.dedent(text).encode()
        path.write_bytes(text)
        path.chmod(mode)
        return str(path)

    return write


def error_of(path: str, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, env={} if env is None else env)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- valid files ---------------------------------------------------------------------


def test_jw_backup_1_0_config_loads_unchanged(write):
    path = write("""\
        roots: [/, /home]
        prune:
          - /tmp
          - /var/cache/
        destination:
          host: backup.example.org
          user: backup
          directory: /backup/{HOSTNAME}/rsync-backup
          generations: 30
        """)
    assert config.load(path, env={"HOSTNAME": "alpha"}) == Config(
        path=path,
        roots=("/", "/home"),
        prune=("/tmp", "/var/cache"),
        destination=Destination(
            directory="/backup/alpha/rsync-backup", host="backup.example.org", user="backup", generations=30
        ),
    )


def test_hostname_falls_back_to_the_system_hostname_when_not_in_environment(write):
    path = write("destination: {directory: '/backup/{HOSTNAME}'}\n")
    assert config.load(path, env={}).destination.directory == "/backup/" + socket.gethostname()


def test_other_variables_come_from_the_environment_and_double_braces_are_literal(write):
    path = write("destination:\n  directory: /{BASE}/{{x}}/{HOSTNAME}/\n")
    loaded = config.load(path, env={"BASE": "srv/backup", "HOSTNAME": "beta"})
    assert loaded.destination.directory == "/srv/backup/{x}/beta"


def test_environment_defaults_to_os_environ(write, monkeypatch):
    monkeypatch.setenv("JWBACKUP_TEST_BASE", "from-environ")
    path = write("destination:\n  directory: /{JWBACKUP_TEST_BASE}\n")
    assert config.load(path).destination.directory == "/from-environ"


def test_minimal_file_gets_documented_defaults(write):
    path = write("destination:\n  directory: /backup\n")
    loaded = config.load(path, env={})
    assert loaded.roots == ("/",)
    assert loaded.prune == (
        "/tmp", "/proc", "/sys", "/dev", "/mnt", "/var/tmp", "/var/run", "/var/cache", "/run", "/lost+found",
    )
    assert loaded.destination == Destination(directory="/backup")
    assert loaded.destination.port == 22 and loaded.destination.generations == 30
    assert not loaded.destination.remote
    assert loaded.manager is None
    assert loaded.lock_file == "/run/lock/jwbackup/jwbackup.lock"


def test_file_without_destination_section_has_none(write):
    assert config.load(write("root: /\n"), env={}).destination is None


def test_explicit_empty_prune_list_prunes_nothing(write):
    assert config.load(write("prune: []\n"), env={}).prune == ()


def test_single_strings_are_accepted_for_root_and_prune_and_paths_are_normalised(write):
    loaded = config.load(write("root: //srv/./data/\nprune: /srv/data/cache//\n"), env={})
    assert loaded.roots == ("/srv/data",)
    assert loaded.prune == ("/srv/data/cache",)


def test_every_option_is_read(write):
    path = write("""\
        root: [/, /home]
        prune: [/tmp]
        destination:
          host: nas
          user: backup
          port: 2222
          key: /root/.ssh/id_backup
          password: s3cret
          known_hosts: /etc/jwbackup/known_hosts
          accept_new_host_key: yes
          directory: /backup
          generations: 10
          keep: {daily: 7, weekly: 4, monthly: 6}
        manager: dpkg
        lock_file: /run/lock/other/jwbackup.lock
        """)
    loaded = config.load(path, env={})
    assert loaded.destination == Destination(
        directory="/backup", host="nas", user="backup", port=2222, key="/root/.ssh/id_backup",
        password="s3cret", known_hosts="/etc/jwbackup/known_hosts", accept_new_host_key=True,
        generations=10, keep=Keep(daily=7, weekly=4, monthly=6, yearly=0),
    )
    assert loaded.destination.remote
    assert loaded.manager == "dpkg"
    assert loaded.lock_file == "/run/lock/other/jwbackup.lock"


def test_password_in_a_file_only_root_can_read_is_accepted(write):
    path = write("destination: {directory: /b, host: h, password: pw}\n", mode=0o600)
    assert config.load(path, env={}).destination.password == "pw"


# --- dump ----------------------------------------------------------------------------


def test_dump_masks_the_password_and_lists_keys_in_a_readable_order(write):
    path = write("destination: {directory: /b, host: h, password: 'p@ss word'}\n")
    text = config.dump(config.load(path, env={}))
    assert "p@ss word" not in text
    assert "password: '********'" in text
    keys = [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")]
    assert keys == ["root", "prune", "destination", "lock_file"]


def test_dump_loads_back_into_an_equal_config(write, tmp_path):
    original = config.load(write("""\
        roots: [/, /home]
        prune: []
        destination:
          host: "yes"
          user: "22"
          directory: '/backup/{{braces}}/{HOSTNAME}'
          key: /root/.ssh/id
          password: secret
          accept_new_host_key: true
          keep: {yearly: 2}
        manager: portage
        """), env={"HOSTNAME": "gamma"})
    dumped = config.dump(original)
    again = config.load(write(dumped, name="dumped.yaml"), env={})
    assert again == dataclasses.replace(
        original, path=again.path, destination=dataclasses.replace(original.destination, password="********")
    )
    without_password = "".join(line for line in dumped.splitlines(True) if "password" not in line)
    again = config.load(write(without_password, name="dumped2.yaml", mode=0o644), env={})
    assert again.destination == dataclasses.replace(original.destination, password=None)


def test_dump_of_a_config_without_destination_round_trips(write):
    original = config.load(write("root: [/srv]\nmanager: dpkg\n"), env={})
    again = config.load(write(config.dump(original), name="d.yaml"), env={})
    assert dataclasses.replace(again, path=original.path) == original


# --- file-level mistakes ---------------------------------------------------------------


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert error_of(path) == f"{path}: configuration file not found"


def test_unreadable_file(tmp_path):
    assert error_of(str(tmp_path)) == f"{tmp_path}: cannot read the configuration file: Is a directory"


def test_empty_file(write):
    path = write("")
    assert error_of(path) == f"{path}: configuration file is empty"
    path = write("# only a comment\n\n", name="comments.yaml")
    assert error_of(path) == f"{path}: configuration file is empty"


def test_yaml_syntax_error_names_yaml_line(write):
    path = write("root: /\nprune:\n  - /tmp\n  bad: [\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: YAML syntax error: ")


@pytest.mark.parametrize("text", ['prune: ["/tmp\n', "prune: ['/tmp\n", "prune: [/tmp, /var\n", "destination: {directory: /b\n"])
def test_a_quote_or_bracket_never_closed_is_named_where_it_opens(write, text):
    path = write("root: /\n" + text + "\n" * 10 + "# the end\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2: YAML syntax error: "), message


def test_top_level_must_be_a_mapping(write):
    path = write("- /\n- /home\n")
    assert error_of(path) == (
        f"{path}:1: the configuration must be a mapping of keys "
        "(root, roots, prune, destination, manager, lock_file, hooks, verify, transfer), not a list"
    )


def test_not_utf8(write):
    path = write(b"root: /\nprune: /caf\xe9\n")
    assert error_of(path) == f"{path}:2: not valid UTF-8 text (byte 0xe9)"


def test_control_character(write):
    path = write("root: /\nprune: /a\x07b\n")
    assert error_of(path) == f"{path}:2: contains a control character (0x07) YAML does not allow"


def test_more_than_one_document(write):
    path = write("root: /\n---\nprune: []\n")
    assert error_of(path) == f"{path}:2: more than one YAML document (---); put everything in one"


def test_file_over_one_mib_is_refused_before_parsing(write):
    path = write("prune:\n" + "  - /x\n" * 200_000)
    assert error_of(path) == f"{path}: configuration file is larger than 1 MiB; refusing to read it"


def test_alias_bomb_is_refused_quickly(write):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = write("\n".join(lines) + "\nroot: *a9\n")
    start = time.monotonic()
    message = error_of(path)
    assert time.monotonic() - start < 1
    assert message == f"{path}:2: YAML aliases are not allowed (*a0); write the value out"


def test_deep_nesting_is_refused(write):
    path = write("root: " + "[" * 12 + "]" * 12 + "\n")
    assert error_of(path) == f"{path}:1: nested more than 10 levels deep"


# --- key and value mistakes ------------------------------------------------------------


def test_unknown_key_suggests_the_close_one(write):
    path = write("root: /\ndestination:\n  directory: /b\n  hots: nas\n")
    assert error_of(path) == f"{path}:4: destination.hots: unknown key; did you mean 'host'?"


def test_unknown_key_without_close_match_lists_known_keys(write):
    path = write("compression: zstd\n")
    assert error_of(path) == (
        f"{path}:1: compression: unknown key; known keys: root, roots, prune, destination, manager, lock_file, hooks, verify, transfer"
    )


def test_duplicate_key(write):
    path = write("destination:\n  directory: /a\n  directory: /b\n")
    assert error_of(path) == f"{path}:3: destination.directory: duplicate key (first on line 2)"


def test_keys_must_be_names(write):
    path = write("root: /\n1: x\n")
    assert error_of(path) == f"{path}:2: keys must be names, not a whole number (1)"
    path = write("destination:\n  <<: {directory: /b}\n", name="merge.yaml")
    assert error_of(path) == f"{path}:2: destination: merge keys (<<) are not allowed; write the keys out"


def test_root_and_roots_together(write):
    path = write("root: /\nprune: []\nroots: [/home]\n")
    assert error_of(path) == f"{path}:3: roots: 'root' and 'roots' are the same setting; keep only one"


def test_string_expected_but_yaml_read_a_boolean(write):
    path = write("destination:\n  directory: /b\n  user: yes\n")
    assert error_of(path) == (
        f"{path}:3: destination.user: must be a string, not a boolean (yes); put it in quotes if you mean the text"
    )


def test_string_expected_but_got_a_number_is_not_converted(write):
    path = write("destination:\n  directory: /b\n  host: 10.1\n")
    assert error_of(path) == (
        f"{path}:3: destination.host: must be a string, not a fractional number (10.1); "
        "put it in quotes if you mean the text"
    )


def test_boolean_is_not_a_number(write):
    path = write("destination:\n  directory: /b\n  generations: yes\n")
    assert error_of(path) == f"{path}:3: destination.generations: must be a positive whole number, not a boolean (yes)"


def test_number_is_not_a_boolean(write):
    path = write("destination:\n  directory: /b\n  accept_new_host_key: 1\n")
    assert error_of(path) == (
        f"{path}:3: destination.accept_new_host_key: must be true or false, not a whole number (1)"
    )


def test_quoted_number_is_not_a_number(write):
    path = write("destination:\n  directory: /b\n  port: '22'\n")
    assert error_of(path) == (
        f"{path}:3: destination.port: must be a port number from 1 to 65535, not a string (22)"
    )


def test_mapping_where_a_list_is_expected(write):
    path = write("root:\n  home: /home\n")
    assert error_of(path) == f"{path}:2: root: must be a list of absolute paths or one path, not a mapping"


def test_empty_prune_value_asks_for_an_explicit_list(write):
    path = write("prune:\nroot: /\n")
    assert error_of(path) == (
        f"{path}:1: prune: must be a list of absolute paths or one path, not an empty value; write [] for none"
    )


def test_relative_path_in_a_list(write):
    path = write("roots:\n  - /\n  - home\n")
    assert error_of(path) == f"{path}:3: roots[1]: must be an absolute path (starting with /), not home"


def test_relative_destination_directory(write):
    path = write("destination:\n  directory: backup\n")
    assert error_of(path) == (
        f"{path}:2: destination.directory: must be an absolute path (starting with /), not backup"
    )


def test_with_a_host_a_relative_directory_and_a_key_under_home_are_taken_as_ssh_takes_them(write, monkeypatch):
    """As jw.backup 1.0 configs wrote them: the directory from the login directory, ~ in the key."""
    monkeypatch.setenv("HOME", "/home/admin")
    path = write("destination:\n  host: nas\n  directory: backups/./{HOSTNAME}/\n  key: ~/.ssh/id_backup\n")
    dest = config.load(path, env={"HOSTNAME": "alpha"}).destination
    assert (dest.directory, dest.key) == ("backups/alpha", "/home/admin/.ssh/id_backup")


@pytest.mark.parametrize("value, problem", [
    ("/tmp/jwbackup.lock", "/tmp is writable by other users: put the lock in a directory of its own, "
                           "such as /run/lock/jwbackup"),
    ("/", "must name a file, not the directory /"),
    ("/run/lock/jwbackup/", "must name a file, not the directory /run/lock/jwbackup/"),
])
def test_lock_file_in_a_shared_directory_or_a_directory_is_refused_at_its_line(write, value, problem):
    path = write(f"root: /\nlock_file: {value}\n")
    assert error_of(path) == f"{path}:2: lock_file: {problem}"


def test_an_unknown_package_manager_is_refused_at_its_line(write):
    path = write("root: /\nmanager: rpm\n")
    assert error_of(path) == f"{path}:2: manager: must be one of dpkg, portage, not 'rpm'"


def test_generations_must_be_positive(write):
    path = write("root: /\nprune: []\ndestination:\n  host: nas\n  directory: /b\n  port: 22\n  generations: 0\n")
    assert error_of(path) == f"{path}:7: destination.generations: must be a positive whole number, not 0"


@pytest.mark.parametrize("text, read_as", [("010", 8), ("0022", 18), ("1:30", 90), ("1_000", 1000), ("0x1e", 30)])
def test_numbers_are_plain_decimal_never_octal_or_base_60(write, text, read_as):
    """YAML 1.1 reads 010 as 8: with generations that would expire backups the admin meant to keep."""
    path = write(f"destination:\n  directory: /b\n  generations: {text}\n")
    assert error_of(path) == (f"{path}:3: destination.generations: must be a positive whole number in plain "
                              f"decimal digits, not {text}, which YAML reads as {read_as}")
    assert config.load(write("destination:\n  directory: /b\n  generations: 10\n  port: +22\n"),
                       env={}).destination.generations == 10


@pytest.mark.parametrize("value", ["20240611", "off", "2024-01-02", "[s3cret]"])
def test_a_password_that_is_not_a_string_is_refused_without_showing_it(write, value):
    path = write(f"destination:\n  directory: /b\n  host: nas\n  password: {value}\n")
    message = error_of(path)
    assert message == f"{path}:4: destination.password: must be a string; put it in quotes"
    assert value.strip("[]") not in message.replace(path, "")


def test_a_configuration_file_other_users_can_change_is_refused(write):
    """Its hooks run as root: whoever can write it can run anything as root."""
    path = write("root: /\nhooks: {before: 'id > /tmp/owned'}\n", mode=0o666)
    assert error_of(path) == (f"{path}: writable by other users (mode 0666), who could make jwbackup run any "
                              f"command; run: chmod go-w {path}")
    os.chmod(path, 0o620)
    os.chown(path, 0, 1234)
    assert "writable by other users (mode 0620)" in error_of(path)
    os.chown(path, 0, 0)  # group root: root's own
    assert config.load(path, env={}).hooks.before == ("id > /tmp/owned",)
    os.chmod(path, 0o644)
    os.chown(path, 1234, 0)
    assert error_of(path) == (f"{path}: owned by uid 1234, who could make jwbackup run any command; "
                              f"run: chown root {path}")


def test_keep_values_must_not_be_negative(write):
    path = write("destination:\n  directory: /b\n  keep:\n    daily: 7\n    weekly: -1\n")
    assert error_of(path) == f"{path}:5: destination.keep.weekly: must be a whole number, 0 or more, not -1"


def test_unknown_keep_rule(write):
    path = write("destination:\n  directory: /b\n  keep: {dayly: 7}\n")
    assert error_of(path) == f"{path}:3: destination.keep.dayly: unknown key; did you mean 'daily'?"


def test_port_out_of_range(write):
    path = write("destination:\n  directory: /b\n  port: 70000\n")
    assert error_of(path) == f"{path}:3: destination.port: must be a port number from 1 to 65535, not 70000"


def test_timeout_defaults_to_300_seconds_and_must_be_from_1_to_86400(write):
    assert config.load(write("destination:\n  directory: /b\n"), env={}).destination.timeout == 300
    path = write("destination:\n  directory: /b\n  timeout: 30\n")
    assert config.load(path, env={}).destination.timeout == 30
    path = write("destination:\n  directory: /b\n  timeout: 0\n")
    assert error_of(path) == f"{path}:3: destination.timeout: must be a number of seconds from 1 to 86400, not 0"


def test_huge_number_is_refused(write):
    path = write("destination:\n  directory: /b\n  generations: " + "9" * 5000 + "\n")
    assert error_of(path) == (
        f"{path}:3: destination.generations: must be a positive whole number, not a number that large"
    )


def test_missing_destination_directory(write):
    path = write("root: /\ndestination:\n  host: nas\n")
    assert error_of(path) == f"{path}:2: destination.directory: missing; name the directory the backups go to"


def test_undefined_variable_is_named(write):
    path = write("destination:\n  directory: /backup/{SITE}/{HOSTNAME}\n")
    assert error_of(path, env={"HOSTNAME": "h"}) == (
        f"{path}:2: destination.directory: variable {{SITE}} is not set in the environment"
    )


def test_unmatched_brace(write):
    path = write("destination:\n  directory: /backup/{SITE\n")
    assert error_of(path) == (
        f"{path}:2: destination.directory: unmatched '{{' in /backup/{{SITE; write '{{{{' for a literal brace"
    )


def test_password_in_a_file_others_can_read_is_refused_with_the_fix(write):
    path = write("destination:\n  directory: /b\n  host: nas\n  password: pw\n", mode=0o644)
    assert error_of(path) == (
        f"{path}:4: destination.password: {path} holds a password but is readable by group or others "
        f"(mode 0644); run: chmod 600 {path}"
    )
    os.chmod(path, 0o640)
    assert "(mode 0640); run: chmod 600" in error_of(path)


def test_python_tags_are_not_executed(write):
    path = write("manager: !!python/object/apply:os.system ['true']\n")
    assert error_of(path) == (
        f"{path}:1: manager: must be a string, not a list tagged tag:yaml.org,2002:python/object/apply:os.system"
    )


# --- hooks -----------------------------------------------------------------------------


def test_hooks_are_lists_of_shell_commands_and_a_single_string_is_one_command(write):
    cfg = config.load(write("""\
        hooks:
          before: ["mount /backup", "test -d /backup/host"]
          after: umount /backup
        """), env={})
    assert cfg.hooks == config.Hooks(before=("mount /backup", "test -d /backup/host"), after=("umount /backup",))
    assert config.load(write("root: /\n", name="plain.yaml"), env={}).hooks == config.Hooks()


def test_hooks_round_trip_through_dump(write):
    original = config.load(write("hooks: {on_error: ['mail -s \"backup failed\" root < /dev/null']}\n"), env={})
    again = config.load(write(config.dump(original), name="d.yaml"), env={})
    assert again.hooks == original.hooks


@pytest.mark.parametrize("text, expected", [
    ("hooks: [echo]\n", "x.yaml:1: hooks: must be a mapping of keys (before, after, on_error), not a list"),
    ("hooks:\n  befor: [echo]\n", "x.yaml:2: hooks.befor: unknown key; did you mean 'before'?"),
    ("hooks:\n  after:\n    - echo\n    - 3\n", "x.yaml:4: hooks.after[1]: must be a string, not a whole number (3)"),
    ("hooks:\n  on_error:\n", "x.yaml:2: hooks.on_error: must be a list of shell commands or one command, not an empty value"),
    ("hooks:\n  before: ['']\n", "x.yaml:2: hooks.before[0]: must not be empty"),
])
def test_bad_hooks_get_one_line_naming_file_line_and_key(write, text, expected):
    path = write(text, name="x.yaml")
    assert error_of(path).startswith(path[: -len("x.yaml")] + expected)


# --- verify ----------------------------------------------------------------------------


def test_verify_defaults_to_all_and_takes_conffiles_or_none(write):
    assert config.load(write("root: /\n"), env={}).verify == "all"
    for mode in ("all", "conffiles", "none"):
        cfg = config.load(write(f"verify: {mode}\n", name=f"{mode}.yaml"), env={})
        assert cfg.verify == mode
        assert config.load(write(config.dump(cfg), name=f"{mode}-dump.yaml"), env={}).verify == mode


@pytest.mark.parametrize("text, expected", [
    ("verify: md5\n", "x.yaml:1: verify: must be one of all, conffiles, none, not 'md5'"),
    ("verify: no\n", "x.yaml:1: verify: must be one of all, conffiles, none, not a boolean (no)"),
])
def test_bad_verify_mode_gets_one_line_naming_the_choices(write, text, expected):
    path = write(text, name="x.yaml")
    assert error_of(path).startswith(path[: -len("x.yaml")] + expected)


# --- transfer --------------------------------------------------------------------------


def test_transfer_defaults_to_auto_and_takes_rsync(write):
    assert config.load(write("root: /\n"), env={}).transfer == "auto"
    for mode in ("auto", "rsync"):
        cfg = config.load(write(f"transfer: {mode}\n", name=f"t-{mode}.yaml"), env={})
        assert cfg.transfer == mode
        assert config.load(write(config.dump(cfg), name=f"t-{mode}-dump.yaml"), env={}).transfer == mode


def test_bad_transfer_mode_gets_one_line_naming_the_choices(write):
    path = write("transfer: cp\n", name="x.yaml")
    assert error_of(path).startswith(path[: -len("x.yaml")] + "x.yaml:1: transfer: must be one of auto, rsync, not 'cp'")
