# Kill-and-resume test of examples/pretrain: a run stopped after 5 steps (as by a kill; the
# checkpoint is written on the way out) and resumed must log exactly the losses, auxiliary losses,
# gradient norms and validation losses of an uninterrupted run.
#   cmake -DPRETRAIN=<exe> -DTOKENIZER=<file> -DWORK=<dir> -P pretrain_resume.cmake
cmake_policy(SET CMP0007 NEW)  # keep empty cells (blank validation columns) as list elements
set(args --corpus brown --brown-dir ${BROWN} --tokenizer ${TOKENIZER} --arch switch --d-model 32 --layers 2
         --heads 4 --ffn 48 --experts 4 --seq-len 32 --batch 4 --steps 12 --warmup 2 --eval-every 4
         --eval-batches 2 --ckpt-every 4 --log-every 1)
file(REMOVE_RECURSE ${WORK})
execute_process(COMMAND ${PRETRAIN} ${args} --out ${WORK}/straight RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "uninterrupted run failed (${rc})")
endif()
execute_process(COMMAND ${PRETRAIN} ${args} --out ${WORK}/resumed --stop-after 5 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR EXISTS ${WORK}/resumed/result.json)
  message(FATAL_ERROR "the interrupted run should stop early with status 0 (${rc})")
endif()
execute_process(COMMAND ${PRETRAIN} ${args} --out ${WORK}/resumed RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0 OR NOT err MATCHES "resuming .* from step 5")
  message(FATAL_ERROR "resume failed (${rc}): ${err}")
endif()
# Drop the wall-clock column (tokens_per_s, the 6th); lr stays: the schedule must continue too.
foreach(run straight resumed)
  file(STRINGS ${WORK}/${run}/log.csv lines)
  set(text "")
  foreach(line IN LISTS lines)
    string(REPLACE "," ";" cells "${line};")
    list(REMOVE_AT cells 5)
    string(APPEND text "${cells}\n")
  endforeach()
  set(${run} "${text}")
  list(LENGTH lines n_${run})
endforeach()
if(NOT straight STREQUAL resumed)
  message(FATAL_ERROR "resumed log differs:\n--- straight\n${straight}\n--- resumed\n${resumed}")
endif()
if(NOT n_straight EQUAL 13)
  message(FATAL_ERROR "expected 12 logged steps and a header, got ${n_straight} lines")
endif()
message(STATUS "resumed run matches the uninterrupted run exactly")
