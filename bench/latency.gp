# bench/latency.gp: `make bench`'s chart (bench/run.sh writes the data and
# runs it): 1:1 send-to-receive latency against offered rate, p99 solid and
# p50 dashed, one colour per mode, both axes logarithmic.
#   gnuplot -e "data='F'; out='latency.svg'; titles='parleyd stack ejabberd'; note='...'" bench/latency.gp
# data: one block per title (blocks apart by two blank lines), rows
# "offered-rate p50-ms p99-ms".
set terminal svg size 900,500 dynamic enhanced font 'Helvetica,13' background rgb 'white'
set output out
set title "1:1 send-to-receive latency against offered rate (100 pairs)\n".note noenhanced
set logscale xy
set xlabel 'offered rate (messages/s)'
set ylabel 'latency (ms)'
set grid xtics ytics mxtics mytics lc rgb '#dddddd'
set key outside right top
set style data linespoints
n = words(titles)
plot for [i=1:n] data index (i-1) using 1:3 lw 2 pt 7 ps 0.8 lc i title word(titles, i).' p99', \
     for [i=1:n] data index (i-1) using 1:2 lw 1.5 dt 2 pt 6 ps 0.8 lc i title word(titles, i).' p50'
