# Copyright 2026 jwbackup maintainers
# Distributed under the terms of the GNU General Public License v2

EAPI=8

DISTUTILS_USE_PEP517=setuptools
DISTUTILS_SINGLE_IMPL=1
PYTHON_COMPAT=( python3_{10..13} )

inherit distutils-r1 optfeature systemd

DESCRIPTION="Daily differential backup that leaves out what the package manager can reinstall"
# The release tarball is made from the source tree with "make dist".
SRC_URI="${P}.tar.gz"

LICENSE="GPL-3+"
SLOT="0"
KEYWORDS="~amd64 ~arm64 ~x86"
# The test suite installs packages and starts an sshd; it runs outside the build.
RESTRICT="fetch test"

# rsync runs with -aHAX: ACLs and extended attributes are kept.
RDEPEND="
	net-misc/rsync[acl,xattr]
	$(python_gen_cond_dep '
		dev-python/pyyaml[${PYTHON_USEDEP}]
		sys-apps/portage[${PYTHON_USEDEP}]
	')
"

pkg_nofetch() {
	einfo "Make ${A} with \"make dist\" in the jwbackup source tree"
	einfo "and copy it to your DISTDIR."
}

python_install_all() {
	distutils-r1_python_install_all

	insinto /etc
	doins etc/jwbackup.yaml
	insinto /etc/default
	doins etc/default/jwbackup
	exeinto /etc/cron.daily
	doexe etc/cron.daily/jwbackup
	insinto /etc/logrotate.d
	doins etc/logrotate.d/jwbackup
	systemd_dounit etc/systemd/jwbackup.service etc/systemd/jwbackup.timer
	doman man/jwbackup.8
	docinto examples
	dodoc etc/examples/jwbackup-quick.yaml
	docompress -x /usr/share/doc/${PF}/examples
}

pkg_postinst() {
	optfeature "destinations on another host (destination.host)" virtual/openssh
	optfeature "ssh logins with a password (destination.password)" net-misc/sshpass
	if [[ -z ${REPLACING_VERSIONS} ]]; then
		elog "Edit /etc/jwbackup.yaml, then create the destination with"
		elog "    jwbackup init"
		elog "Daily runs: under systemd, systemctl enable --now jwbackup.timer;"
		elog "otherwise /etc/cron.daily/jwbackup runs when a cron daemon is installed."
	fi
}
