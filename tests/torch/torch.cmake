# tests/torch/torch.cmake: the PyTorch oracle. moe_oracle.py computes reference forwards, losses
# and gradients with PyTorch autograd; moe_torch_tests compares our layer against them.
#
# The oracle is part of the suite, never skipped.
# It runs under Debian's /usr/bin/python3 because that is where python3-torch installs.

# Without PyTorch the configure still succeeds (the main job must not need what only the tests
# need), and the oracle becomes one test that fails, saying what to install: it is never skipped.
find_program(MOE_TORCH_PYTHON python3 PATHS /usr/bin NO_DEFAULT_PATH)
set(_moe_torch_missing "")
if(NOT MOE_TORCH_PYTHON)
  set(_moe_torch_missing "/usr/bin/python3 is missing")
else()
  execute_process(
    COMMAND ${MOE_TORCH_PYTHON} -c "import torch"
    RESULT_VARIABLE _moe_torch_rc
    OUTPUT_QUIET
    ERROR_VARIABLE _moe_torch_err)
  if(NOT _moe_torch_rc EQUAL 0)
    string(STRIP "${_moe_torch_err}" _moe_torch_err)
    if(_moe_torch_err MATCHES "([^\n]+)$")  # the exception, not the trace
      set(_moe_torch_err "${CMAKE_MATCH_1}")
    endif()
    set(_moe_torch_missing "`${MOE_TORCH_PYTHON} -c \"import torch\"` failed: ${_moe_torch_err}")
  endif()
endif()
if(_moe_torch_missing)
  set(_moe_torch_hint "The PyTorch oracle needs /usr/bin/python3 with torch (${_moe_torch_missing}): run scripts/install-deps.sh --test, then configure again")
  message(WARNING "${_moe_torch_hint}. The oracle tests will fail until then.")
  add_test(NAME torch_oracle_missing COMMAND sh -c "echo \"$1\" >&2; exit 1" sh "${_moe_torch_hint}")
  return()
endif()

set(MOE_TORCH_CASES ${CMAKE_CURRENT_BINARY_DIR}/torch_cases.json)

# The cases are written at test time, not build time, so ctest alone regenerates them.
add_test(NAME torch_oracle_generate
  COMMAND ${MOE_TORCH_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/moe_oracle.py ${MOE_TORCH_CASES})
set_tests_properties(torch_oracle_generate PROPERTIES FIXTURES_SETUP torch_cases)

add_executable(moe_torch_tests ${CMAKE_CURRENT_LIST_DIR}/test_torch_oracle.cpp)
target_include_directories(moe_torch_tests PRIVATE ${PROJECT_SOURCE_DIR}/src)
target_compile_options(moe_torch_tests PRIVATE ${MOE_WARNINGS})
target_link_libraries(moe_torch_tests PRIVATE moe_core GTest::gtest GTest::gtest_main)

# One ctest test for the whole binary: gtest_discover_tests would list the tests at build time,
# and the test bodies iterate over cases that only exist once torch_oracle_generate has run.
add_test(NAME torch_oracle COMMAND moe_torch_tests)
set_tests_properties(torch_oracle PROPERTIES
  FIXTURES_REQUIRED torch_cases
  ENVIRONMENT "MOE_TORCH_CASES=${MOE_TORCH_CASES}")

# The language model's oracle: lm_oracle.py computes the losses, gradients and an AdamW
# trajectory of small models (docs/model.md); moe_lm_torch_tests compares our model against them.
set(MOE_LM_TORCH_CASES ${CMAKE_CURRENT_BINARY_DIR}/lm_torch_cases.json)

add_test(NAME lm_torch_oracle_generate
  COMMAND ${MOE_TORCH_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/lm_oracle.py ${MOE_LM_TORCH_CASES})
set_tests_properties(lm_torch_oracle_generate PROPERTIES FIXTURES_SETUP lm_torch_cases)

add_executable(moe_lm_torch_tests ${CMAKE_CURRENT_LIST_DIR}/test_lm_oracle.cpp)
target_include_directories(moe_lm_torch_tests PRIVATE ${PROJECT_SOURCE_DIR}/src)
target_compile_options(moe_lm_torch_tests PRIVATE ${MOE_WARNINGS})
target_link_libraries(moe_lm_torch_tests PRIVATE moe_core GTest::gtest GTest::gtest_main)

# One ctest test for the whole binary, as above.
add_test(NAME lm_torch_oracle COMMAND moe_lm_torch_tests)
set_tests_properties(lm_torch_oracle PROPERTIES
  FIXTURES_REQUIRED lm_torch_cases
  ENVIRONMENT "MOE_LM_TORCH_CASES=${MOE_LM_TORCH_CASES}")
