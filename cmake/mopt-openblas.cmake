# Defines the imported target mopt::openblas (CBLAS header + library). Used by mopt's build and
# by its installed package config.
#
# mopt's loops use OpenMP; OpenBLAS must use the same OpenMP thread pool. The pthreads build of
# OpenBLAS spins a second pool against OpenMP's, which made a small training step 5x slower on
# 2 cores. Debian ships the OpenMP build in its own folder (libopenblas-openmp-dev), so it is
# linked there by path, with an RPATH, whatever the system-wide alternative says.
include_guard(GLOBAL)
if(NOT TARGET mopt::openblas)
  set(_mopt_arch_dir "${CMAKE_LIBRARY_ARCHITECTURE}")
  if(NOT _mopt_arch_dir)
    set(_mopt_arch_dir "${CMAKE_SYSTEM_PROCESSOR}-linux-gnu")
  endif()
  find_library(MOPT_OPENBLAS_LIBRARY NAMES openblas
               PATHS /usr/lib/${_mopt_arch_dir}/openblas-openmp /usr/lib64/openblas-openmp NO_DEFAULT_PATH)
  find_path(MOPT_CBLAS_INCLUDE_DIR cblas.h
            PATHS /usr/include/${_mopt_arch_dir}/openblas-openmp /usr/include/openblas-openmp NO_DEFAULT_PATH)
  if(NOT MOPT_OPENBLAS_LIBRARY OR NOT MOPT_CBLAS_INCLUDE_DIR)
    unset(MOPT_OPENBLAS_LIBRARY CACHE)
    unset(MOPT_CBLAS_INCLUDE_DIR CACHE)
    find_library(MOPT_OPENBLAS_LIBRARY NAMES openblas)
    find_path(MOPT_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas ${_mopt_arch_dir})
    if(NOT MOPT_OPENBLAS_LIBRARY OR NOT MOPT_CBLAS_INCLUDE_DIR)
      message(FATAL_ERROR "mopt: OpenBLAS not found. On Debian/Ubuntu install it with:\n"
                          "  sudo apt-get install libopenblas-openmp-dev")
    endif()
    message(WARNING "mopt: using ${MOPT_OPENBLAS_LIBRARY}, which may not be OpenBLAS's OpenMP build; "
                    "its threads can fight OpenMP's. Install libopenblas-openmp-dev for full speed.")
  endif()
  add_library(mopt::openblas INTERFACE IMPORTED)
  set_target_properties(mopt::openblas PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${MOPT_CBLAS_INCLUDE_DIR}"
                                                  INTERFACE_LINK_LIBRARIES "${MOPT_OPENBLAS_LIBRARY}")
  get_filename_component(_mopt_blas_dir "${MOPT_OPENBLAS_LIBRARY}" DIRECTORY)
  # The soname libopenblas.so.0 would otherwise resolve through the system alternative.
  set_property(TARGET mopt::openblas APPEND PROPERTY INTERFACE_LINK_OPTIONS "LINKER:-rpath,${_mopt_blas_dir}")
endif()
