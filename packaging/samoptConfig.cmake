# find_package(samopt) support: the imported target samopt::samopt (the shared library with the
# include directory holding samopt.h and samopt.hpp), and samopt::static (the static library).
# Relocatable: paths are found from this file's own place, <prefix>/lib/cmake/samopt.
get_filename_component(_samopt_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET samopt::samopt)
  add_library(samopt::samopt SHARED IMPORTED)
  set_target_properties(samopt::samopt PROPERTIES
    IMPORTED_LOCATION "${_samopt_prefix}/lib/libsamopt.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_samopt_prefix}/include")
  add_library(samopt::static STATIC IMPORTED)
  set_target_properties(samopt::static PROPERTIES
    IMPORTED_LOCATION "${_samopt_prefix}/lib/libsamopt.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_samopt_prefix}/include"
    INTERFACE_LINK_LIBRARIES "pthread;dl;m;gcc_s")
endif()
set(samopt_INCLUDE_DIRS "${_samopt_prefix}/include")
set(samopt_LIBRARIES samopt::samopt)
unset(_samopt_prefix)
