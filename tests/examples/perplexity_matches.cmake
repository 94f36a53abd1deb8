# examples/perplexity on a committed base model's Brown test split must print the test perplexity,
# overall and per domain, that pre-training recorded in the model's training_result.json (the CLI
# prints 2 decimals: "ppl 81.45", "  press  ppl  84.16").
#   cmake -DPERPLEXITY=<exe> -DMODEL=<models/x> -DBROWN=<data/brown> -DWORK=<dir> -P perplexity_matches.cmake
if(NOT EXISTS "${BROWN}")
  message("skipped: ${BROWN} is missing (scripts/fetch_brown downloads it)")
  return()
endif()
file(READ "${MODEL}/training_result.json" recorded)
string(JSON split_seed GET "${recorded}" run split_seed)
string(JSON domains GET "${recorded}" run domains)
string(JSON seq_len GET "${recorded}" run seq_len)
string(JSON batch GET "${recorded}" run batch)

# A positive decimal as printf("%.2f") shows it (from its first 3 decimals: no double rounding
# unless the recorded value sits within 1e-3 of a tie, which the run's digits would show).
function(two_decimals value out)
  if(NOT value MATCHES "^([0-9]+)\\.?([0-9]*)$")
    message(FATAL_ERROR "not a plain decimal: ${value}")
  endif()
  set(int "${CMAKE_MATCH_1}")
  string(SUBSTRING "${CMAKE_MATCH_2}000" 0 3 frac)
  string(REGEX REPLACE "^0+([0-9])" "\\1" frac "${frac}")  # math(EXPR) reads 0-led digits as decimal anyway
  math(EXPR milli "${int} * 1000 + ${frac}")
  math(EXPR centi "(${milli} + 5) / 10")
  math(EXPR whole "${centi} / 100")
  math(EXPR cents "${centi} % 100")
  if(cents LESS 10)
    set(cents "0${cents}")
  endif()
  set(${out} "${whole}.${cents}" PARENT_SCOPE)
endfunction()

file(MAKE_DIRECTORY "${WORK}")
execute_process(COMMAND "${PERPLEXITY}" --model "${MODEL}" --corpus brown --brown-dir "${BROWN}" --split test
                        --domains ${domains} --split-seed ${split_seed} --seq-len ${seq_len} --batch ${batch}
                        --json "${WORK}/result.json"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "perplexity failed (${rc}):\n${out}\n${err}")
endif()
message("${out}")
string(JSON expected GET "${recorded}" test ppl)
two_decimals(${expected} shown)
string(REPLACE "." "\\." pattern "${shown}")
if(NOT out MATCHES "\nppl ${pattern} ")
  message(FATAL_ERROR "expected the line 'ppl ${shown}' (training_result.json: test ppl ${expected})")
endif()
string(JSON n LENGTH "${recorded}" test per_domain)
math(EXPR last "${n} - 1")
foreach(i RANGE ${last})
  string(JSON domain MEMBER "${recorded}" test per_domain ${i})
  string(JSON value GET "${recorded}" test per_domain ${domain})
  two_decimals(${value} shown_d)
  string(REPLACE "." "\\." pattern "${shown_d}")
  if(NOT out MATCHES "\n  ${domain} +ppl +${pattern} ")
    message(FATAL_ERROR "expected '${domain} ppl ${shown_d}' (training_result.json: ${value})")
  endif()
endforeach()
message("test ppl ${shown} and ${n} domains match ${MODEL}/training_result.json")
