# Builds and installs libsamopt for C and C++ build systems:
#
#   make install PREFIX=/usr/local        (DESTDIR is honoured too)
#
# installs lib/libsamopt.so and lib/libsamopt.a, include/samopt.h and include/samopt.hpp,
# lib/pkgconfig/samopt.pc (pkg-config --cflags --libs samopt) and lib/cmake/samopt/ (CMake's
# find_package(samopt), target samopt::samopt).
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

.PHONY: all install uninstall
all:
	cargo build --release --locked --lib

install: all
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(LIBDIR)/cmake/samopt $(DESTDIR)$(INCLUDEDIR)
	install -m 755 target/release/libsamopt.so $(DESTDIR)$(LIBDIR)/libsamopt.so
	install -m 644 target/release/libsamopt.a $(DESTDIR)$(LIBDIR)/libsamopt.a
	install -m 644 include/samopt.h bindings/cpp/samopt.hpp $(DESTDIR)$(INCLUDEDIR)/
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' \
	    -e 's|@VERSION@|$(VERSION)|g' packaging/samopt.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/samopt.pc
	install -m 644 packaging/samoptConfig.cmake $(DESTDIR)$(LIBDIR)/cmake/samopt/samoptConfig.cmake
	sed -e 's|@VERSION@|$(VERSION)|g' packaging/samoptConfigVersion.cmake.in \
	    > $(DESTDIR)$(LIBDIR)/cmake/samopt/samoptConfigVersion.cmake

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libsamopt.so $(DESTDIR)$(LIBDIR)/libsamopt.a \
	      $(DESTDIR)$(INCLUDEDIR)/samopt.h $(DESTDIR)$(INCLUDEDIR)/samopt.hpp \
	      $(DESTDIR)$(LIBDIR)/pkgconfig/samopt.pc
	rm -rf $(DESTDIR)$(LIBDIR)/cmake/samopt
