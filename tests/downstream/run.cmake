# Installs mopt from MOPT_BUILD_DIR into a temporary prefix, then configures, builds and runs the
# downstream project against it with find_package(mopt).
set(prefix ${MOPT_WORK_DIR}/prefix)
set(build ${MOPT_WORK_DIR}/build)
file(REMOVE_RECURSE ${MOPT_WORK_DIR})
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "downstream test: command failed (${rc}): ${ARGN}")
  endif()
endfunction()
run(${CMAKE_COMMAND} --install ${MOPT_BUILD_DIR} --prefix ${prefix})
run(${CMAKE_COMMAND} -S ${MOPT_DOWNSTREAM_SRC} -B ${build} -G ${MOPT_GENERATOR} -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_PREFIX_PATH=${prefix})
run(${CMAKE_COMMAND} --build ${build})
run(${build}/app)
