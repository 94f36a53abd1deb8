# Finds mopt's dependencies; a missing one stops configuration with the Debian package to install.
include_guard(GLOBAL)

macro(mopt_require package debian_package)
  find_package(${package} ${ARGN} QUIET)
  if(NOT ${package}_FOUND)
    message(FATAL_ERROR "mopt: dependency ${package} not found. On Debian/Ubuntu install it with:\n"
                        "  sudo apt-get install ${debian_package}\n(or run scripts/setup, which installs all of them)")
  endif()
endmacro()

mopt_require(Eigen3 libeigen3-dev 3.3 NO_MODULE)
mopt_require(xtensor xtensor-dev)
mopt_require(xsimd libxsimd-dev)
mopt_require(nlohmann_json nlohmann-json3-dev)
mopt_require(OpenMP libgomp1)
include(${CMAKE_CURRENT_LIST_DIR}/mopt-openblas.cmake)
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(SentencePiece QUIET IMPORTED_TARGET sentencepiece)
endif()
if(NOT SentencePiece_FOUND)
  message(FATAL_ERROR "mopt: dependency sentencepiece not found. On Debian/Ubuntu install it with:\n"
                      "  sudo apt-get install libsentencepiece-dev pkg-config")
endif()
