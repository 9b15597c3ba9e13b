# nvme_hotplug — top-level entry points. Portable between GNU make and FreeBSD's make.
#
#   make         build nvme_hotplug.ko (installs the toolchain on Debian/Ubuntu if missing)
#   make test    run every test (kld build + .ko checks, unit/property tests, QEMU lab)
#   make bench   print the benchmark figures
#
# The real work is in scripts/, so each step can be read and run on its own.

all:
	@sh scripts/build-kld.sh

test:
	@bash scripts/test.sh

bench:
	@bash scripts/bench.sh

clean:
	rm -rf target nvme_hotplug.ko

.PHONY: all test bench clean
