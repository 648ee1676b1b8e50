# Builds and installs libsamopt for C and C++ build systems:
#
#   make install PREFIX=/usr/local        (DESTDIR is honoured too)
#
# installs
#   lib/libsamopt.so.<ABI>.<VERSION>   the shared library, e.g. libsamopt.so.1.0.1.0: C ABI 1
#                                      (SAM_ABI_VERSION in samopt.h), release 0.1.0 (Cargo.toml)
#   lib/libsamopt.so.<ABI>             its SONAME, the name programs linked against it ask for
#   lib/libsamopt.so                   the development link that -lsamopt finds
#   lib/libsamopt.a                    the static library
#   include/samopt.h, samopt.hpp (C++17 RAII wrapper), samopt_torch.hpp (LibTorch optimizer)
#   lib/pkgconfig/samopt.pc            pkg-config --cflags --libs samopt
#   lib/cmake/samopt/                  CMake's find_package(samopt): targets samopt::samopt and
#                                      samopt::static
# Releases with the same ABI are drop-in replacements: the SONAME link moves to the newer file.
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
ABI := $(shell sed -n 's/^\#define SAM_ABI_VERSION \([0-9][0-9]*\)$$/\1/p' include/samopt.h)
SONAME := libsamopt.so.$(ABI)
REALNAME := $(SONAME).$(VERSION)
# The CMake config finds the headers from its own directory, wherever LIBDIR and INCLUDEDIR are.
INCLUDEDIR_FROM_CMAKEDIR := $(shell realpath -m --relative-to='$(LIBDIR)/cmake/samopt' '$(INCLUDEDIR)')
SUBST := -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' \
         -e 's|@VERSION@|$(VERSION)|g' -e 's|@ABI@|$(ABI)|g' -e 's|@INCLUDEDIR_FROM_CMAKEDIR@|$(INCLUDEDIR_FROM_CMAKEDIR)|g'

.PHONY: all install uninstall
all:
	@test -n "$(ABI)" || { echo "Makefile: no SAM_ABI_VERSION in include/samopt.h" >&2; exit 1; }
	cargo build --release --locked --lib

install: all
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(LIBDIR)/cmake/samopt $(DESTDIR)$(INCLUDEDIR)
	install -m 755 target/release/libsamopt.so $(DESTDIR)$(LIBDIR)/$(REALNAME)
	ln -sfn $(REALNAME) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sfn $(SONAME) $(DESTDIR)$(LIBDIR)/libsamopt.so
	install -m 644 target/release/libsamopt.a $(DESTDIR)$(LIBDIR)/libsamopt.a
	install -m 644 include/samopt.h bindings/cpp/samopt.hpp bindings/cpp/samopt_torch.hpp $(DESTDIR)$(INCLUDEDIR)/
	sed $(SUBST) packaging/samopt.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/samopt.pc
	sed $(SUBST) packaging/samoptConfig.cmake.in > $(DESTDIR)$(LIBDIR)/cmake/samopt/samoptConfig.cmake
	sed $(SUBST) packaging/samoptConfigVersion.cmake.in > $(DESTDIR)$(LIBDIR)/cmake/samopt/samoptConfigVersion.cmake

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/$(REALNAME) $(DESTDIR)$(LIBDIR)/$(SONAME) $(DESTDIR)$(LIBDIR)/libsamopt.so \
	      $(DESTDIR)$(LIBDIR)/libsamopt.a $(DESTDIR)$(INCLUDEDIR)/samopt.h $(DESTDIR)$(INCLUDEDIR)/samopt.hpp \
	      $(DESTDIR)$(INCLUDEDIR)/samopt_torch.hpp $(DESTDIR)$(LIBDIR)/pkgconfig/samopt.pc
	rm -rf $(DESTDIR)$(LIBDIR)/cmake/samopt
